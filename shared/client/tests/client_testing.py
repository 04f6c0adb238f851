"""Helpers of the client's tests (imported by name: conftest puts this folder on sys.path)."""

import io

import httpx
from PIL import Image

KEY = "client-test-key"


def png_bytes(color: tuple[int, int, int] = (10, 200, 30), size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel(data: bytes) -> object:
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))


def fetch(url: str, key: str | None = KEY) -> bytes:
    """An output's bytes by plain httpx: what the client's download must write."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.content
