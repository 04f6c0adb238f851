"""Small real media for tests, and facts read back from the videos the services write."""

from __future__ import annotations

import base64
import io
from typing import Any

import av
from PIL import Image


def png_bytes(
    size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (10, 200, 30)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_data_uri(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 32)
) -> str:
    return data_uri(png_bytes(size, color))


def video_facts(data: bytes) -> dict[str, Any]:
    """Codec, size, decoded frame count and frame rate of an encoded video."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = len(list(container.decode(stream)))
        return {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "frames": frames,
            "fps": float(stream.average_rate or 0),
        }


def video_frames(data: bytes) -> list[bytes]:
    """Each decoded frame's RGB bytes."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return [frame.to_ndarray(format="rgb24").tobytes() for frame in container.decode(video=0)]
