"""Safe decoding of caller-supplied media: data URIs and images (no torch here).

Images are untrusted input: only a few formats are opened, the size declared in the
header is checked before any pixel is decoded (decompression bombs), and every decoder
failure becomes `InvalidInput` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Literal
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageOps, UnidentifiedImageError

from model_service.errors import InvalidInput

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_ASPECT_RATIO = 200  # beyond it the models' resizing fails (a side rounds to nothing)
_WHITESPACE = re.compile(rb"\s+")


def parse_data_uri(value: str, *, field: str) -> tuple[bytes, str | None]:
    """`data:[<mime>][;param...][;base64],<data>` -> (bytes, lower-case mime or None)."""
    head, sep, payload = value.partition(",")
    if not head[:5].lower() == "data:" or not sep:
        raise InvalidInput(
            f"{field}: not a data URI; expected data:<type>;base64,<data>", field=field
        )
    params = [p.strip() for p in head[5:].split(";")]
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    mime = params[0].lower() or None
    if mime is not None and not re.fullmatch(r"[a-z0-9.+-]+/[a-z0-9.+-]+", mime):
        raise InvalidInput(f"{field}: data URI has an invalid media type {mime!r}", field=field)
    try:
        raw = unquote_to_bytes(payload)
        if is_base64:
            return base64.b64decode(_WHITESPACE.sub(b"", raw), validate=True), mime
        return raw, mime
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"{field}: the data URI's base64 data is malformed; encode the file with "
            "standard base64 (A-Z, a-z, 0-9, +, /, = padding)",
            field=field,
        ) from None


def image_header(data: bytes, *, field: str) -> tuple[tuple[int, int], int]:
    """(width, height) and channels of an image, from its header (nothing decoded);
    at least 3 channels: it is decoded to RGB. `decode_image` says what is wrong with
    an image whose header is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
                return opened.size, max(3, len(opened.getbands()))
    except Exception:
        return (0, 0), 3


def decode_image(data: bytes, *, field: str, max_pixels: int) -> Image.Image:
    """Decodes a PNG, JPEG, WEBP, GIF (first frame) or BMP into a loaded RGB image.

    EXIF orientation is applied; transparent areas are composited onto white.
    """
    too_large = InvalidInput(
        f"{field}: the image is larger than the limit of {max_pixels} pixels "
        "(width x height); send a smaller image",
        field=field,
        max_pixels=max_pixels,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = opened.size  # from the header; no pixel decoded yet
            if width * height > max_pixels:
                raise too_large
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise InvalidInput(
                    f"{field}: the image is {width}x{height}, one side more than "
                    f"{MAX_ASPECT_RATIO} times the other, which no model can work at; crop "
                    "it, or send an image closer to square",
                    field=field,
                )
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened))
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large from None
    except UnidentifiedImageError:
        raise InvalidInput(
            f"{field}: not a readable image; send a PNG, JPEG, WEBP, GIF or BMP file",
            field=field,
        ) from None
    except Exception as exc:
        raise InvalidInput(
            f"{field}: the image is corrupt or truncated ({exc}); send a complete PNG, JPEG, "
            "WEBP, GIF or BMP file",
            field=field,
        ) from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_plain_rgb_png(data: bytes) -> bool:
    """An 8-bit RGB PNG (IHDR colour type 2) with no transparency and no EXIF: what
    `decode_image` gives back pixel for pixel, so it can be kept as sent instead of
    encoded again (a PNG encode of a megapixel image costs tens of ms)."""
    if len(data) < 26 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = data[24], data[25]
    return bit_depth == 8 and colour_type == 2 and b"tRNS" not in data and b"eXIf" not in data


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_image(
    image: Image.Image, fmt: Literal["png", "jpeg", "webp"], quality: int = 95
) -> bytes:
    """Encodes an image; JPEG drops any alpha channel (composited onto white)."""
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG")
    elif fmt == "jpeg":
        _to_rgb(image).save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="WEBP", quality=quality)
    return out.getvalue()


def video_suffix(data: bytes, *, field: str) -> str:
    """Checks that `data` is a video with at least one decodable frame; returns the file
    suffix of its container (`.mp4`, `.webm`, `.mkv`, `.mov`, ...)."""
    import av  # only for video inputs (custom ComfyUI workflows)

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise InvalidInput(f"{field}: the file has no video stream", field=field)
            next(container.decode(video=0))
            names = container.format.name.split(",")
    except (av.FFmpegError, StopIteration, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"{field}: not a readable video ({exc}); send an mp4, webm or mov", field=field
        ) from None
    for name, suffix in (("mp4", ".mp4"), ("mov", ".mov"), ("webm", ".webm"), ("matroska", ".mkv")):
        if name in names:
            return suffix
    return f".{names[0]}"
