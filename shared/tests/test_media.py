"""Data URIs and untrusted image decoding."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import pytest
from PIL import Image, ImageFile

from model_service.errors import InvalidInput
from model_service.media import decode_image, encode_image, is_plain_rgb_png, parse_data_uri

MAX_PIXELS = 40_000_000


def _png(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG, all black, built without holding its pixels in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    block = 1000
    idat = b"".join(
        compressor.compress(row * min(block, height - y)) for y in range(0, height, block)
    )
    idat += compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def _noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


# --- data URIs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "data", "mime"),
    [
        ("data:image/png;base64,aGVsbG8=", b"hello", "image/png"),
        ("DATA:Image/PNG;BASE64,aGVs\nbG8=", b"hello", "image/png"),
        ("data:image/svg+xml;charset=utf-8;base64,aGVsbG8=", b"hello", "image/svg+xml"),
        ("data:;base64,aGVsbG8=", b"hello", None),
        ("data:text/plain,hello%20world", b"hello world", "text/plain"),
        ("data:,", b"", None),
    ],
)
def test_parse_data_uri(uri: str, data: bytes, mime: str | None) -> None:
    assert parse_data_uri(uri, field="image") == (data, mime)


@pytest.mark.parametrize(
    "uri",
    [
        "image/png;base64,aGVsbG8=",  # no scheme
        "https://example.com/a.png",
        "data:image/png;base64",  # no comma
        "data:image/png;base64,aGVsbG8",  # bad padding
        "data:image/png;base64,aGV@bG8=",  # not base64
        "data:image png;base64,aGVsbG8=",  # bad media type
    ],
)
def test_parse_data_uri_rejects_malformed(uri: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_data_uri(uri, field="images[2]")
    assert info.value.message.startswith("images[2]: ")
    assert info.value.details["field"] == "images[2]"


# --- decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_round_trip(fmt: str) -> None:
    image = _noise((32, 16))
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(_save(image, fmt, **params), field="image", max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.tobytes() == image.tobytes()


def test_jpeg_decodes_to_rgb() -> None:
    data = _save(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG")
    decoded = decode_image(data, field="image", max_pixels=MAX_PIXELS)
    assert (decoded.mode, decoded.size) == ("RGB", (30, 20))
    red, green, blue = decoded.getpixel((15, 10))  # type: ignore[misc]
    assert red > 200
    assert green < 60
    assert blue < 60


def test_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(data, field="image", max_pixels=MAX_PIXELS)
    assert decoded.getpixel((4, 4)) == (255, 0, 0)


def test_transparency_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    decoded = decode_image(_save(image, "PNG"), field="image", max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (0, 0, 255)
    assert decoded.getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    data = _save(image, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, field="image", max_pixels=MAX_PIXELS)
    assert decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[0] > 200
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60


def test_truncated_png_is_invalid_input() -> None:
    data = _save(_noise(), "PNG")
    with pytest.raises(InvalidInput, match=r"^photo: the image is corrupt or truncated") as info:
        decode_image(data[: len(data) // 2], field="photo", max_pixels=MAX_PIXELS)
    assert info.value.details["field"] == "photo"


@pytest.mark.parametrize(
    "data",
    [
        os.urandom(4096),
        b"",
        b"\x89PNG\r\n\x1a\n" + os.urandom(64),
        _save(_noise((8, 8)), "TIFF"),  # a real image, but not an allowed format
    ],
)
def test_unreadable_data_is_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput, match=r"^photo: ") as info:
        decode_image(data, field="photo", max_pixels=MAX_PIXELS)
    assert info.value.details["field"] == "photo"


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (8000, 6000),  # 48 MP: over our limit, under Pillow's own warning threshold
        (20000, 20000),  # 400 MP: Pillow's DecompressionBombError fires while opening
    ],
)
@pytest.mark.usefixtures("no_pixel_decoding")
def test_decompression_bomb_refused_from_header(width: int, height: int) -> None:
    data = _png(width, height)
    assert len(data) < 200_000
    with pytest.raises(
        InvalidInput,
        match=r"^image: the image is larger than the limit of "
        r"40000000 pixels",
    ) as info:
        decode_image(data, field="image", max_pixels=MAX_PIXELS)
    assert info.value.details == {"field": "image", "max_pixels": MAX_PIXELS}


def test_image_at_the_limit_is_accepted() -> None:
    decoded = decode_image(_png(100, 50), field="image", max_pixels=5000)
    assert (decoded.mode, decoded.size) == ("RGB", (100, 50))
    with pytest.raises(InvalidInput, match="limit of 4999 pixels"):
        decode_image(_png(100, 50), field="image", max_pixels=4999)


# --- encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_image(fmt: str) -> None:
    image = Image.new("RGBA", (16, 8), (10, 200, 30, 255))
    data = encode_image(image, fmt, quality=90)  # type: ignore[arg-type]
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.format == fmt.upper()
        assert reopened.size == (16, 8)


def test_encode_png_is_lossless() -> None:
    image = _noise((16, 16))
    assert decode_image(encode_image(image, "png"), field="x", max_pixels=1000).tobytes() == (
        image.tobytes()
    )


def test_data_uri_to_image() -> None:
    png = _save(_noise((4, 4)), "PNG")
    data, mime = parse_data_uri(
        "data:image/png;base64," + base64.b64encode(png).decode(), field="image"
    )
    assert mime == "image/png"
    assert decode_image(data, field="image", max_pixels=16).size == (4, 4)


def test_a_plain_rgb_png_is_recognised_and_others_are_not() -> None:
    """Such a PNG is kept as sent (no second encode): it must decode to the same pixels."""
    rgb = Image.new("RGB", (40, 30), (10, 200, 30))
    plain = _save(rgb, "PNG")
    assert is_plain_rgb_png(plain)
    assert decode_image(plain, field="image", max_pixels=MAX_PIXELS).tobytes() == rgb.tobytes()
    assert not is_plain_rgb_png(_save(rgb.convert("RGBA"), "PNG"))  # alpha: composited
    assert not is_plain_rgb_png(_save(rgb.convert("P"), "PNG"))  # palette
    assert not is_plain_rgb_png(_save(rgb.convert("L"), "PNG"))  # grey
    assert not is_plain_rgb_png(_save(rgb, "PNG", transparency=(10, 200, 30)))  # tRNS
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: decode_image turns it
    assert not is_plain_rgb_png(_save(rgb, "PNG", exif=exif.tobytes()))
    assert not is_plain_rgb_png(_save(rgb, "JPEG"))
    assert not is_plain_rgb_png(b"\x89PNG\r\n\x1a\n")  # cut short
