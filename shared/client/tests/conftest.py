"""Fixtures: one real echo service for the session (API key required), and clients."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # client_testing

from client_testing import KEY
from model_service_client import Client
from model_service_testing.process import ServiceProcess
from model_service_testing.pytest_plugin import echo_process


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The echo service, shared by every test; it asks for an API key (API_KEYS)."""
    process = echo_process(tmp_path_factory.mktemp("echo") / "data", {"API_KEYS": KEY})
    process.headers = {"Authorization": f"Bearer {KEY}"}
    process.start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the client's environment variables themselves."""
    for name in ("MODEL_SERVICE_URL", "MODEL_SERVICE_API_KEY", "RUNPOD_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client(service: ServiceProcess) -> Iterator[Client]:
    with Client(service.url, KEY, timeout=30) as c:
        yield c
