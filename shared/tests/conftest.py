"""Fixtures: real echo-service processes on loopback, with real SQLite files."""

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from model_service.testing import ServiceProcess

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))  # fixture_service, for this process and spawned workers

StartService = Callable[..., ServiceProcess]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    """Start the echo service (kill -9-able, one process group); stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(
        env: dict[str, str] | None = None, wait_ready: bool = True, data_dir: Path | None = None
    ) -> ServiceProcess:
        service = ServiceProcess(
            "fixture_service.serve",
            data_dir or tmp_path / "data",
            env={"JOB_TIMEOUT_S": "60", "CANCEL_GRACE_S": "2", **(env or {})},
            pythonpath=[str(TESTS_DIR)],
        )
        started.append(service)
        return service.start(wait_ready=wait_ready)

    yield start
    for service in started:
        service.stop()
