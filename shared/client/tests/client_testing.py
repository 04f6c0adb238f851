"""Helpers of the client's tests (imported by name: conftest puts this folder on sys.path)."""

import io
from pathlib import Path

import httpx
from PIL import Image

from model_service.testing import ServiceProcess

SHARED_TESTS = Path(__file__).resolve().parents[2] / "tests"  # fixture_service
KEY = "client-test-key"


def echo_service(data_dir: Path, env: dict[str, str] | None = None) -> ServiceProcess:
    """The echo service of shared/tests (`steps`, `step_s`, `behaviour`, `image`, `text`;
    one worker process), not started."""
    return ServiceProcess(
        "fixture_service.serve",
        data_dir,
        env={"JOB_TIMEOUT_S": "60", "CANCEL_GRACE_S": "2", **(env or {})},
        pythonpath=[str(SHARED_TESTS)],
    )


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
