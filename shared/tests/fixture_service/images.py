"""Small real image files for tests."""

import base64
import io

from PIL import Image


def png_bytes(
    size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (10, 200, 30)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
