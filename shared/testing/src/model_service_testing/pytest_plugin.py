"""The shared pytest fixtures of the model services' tests, and the skip policy.

Loaded by pytest wherever `model-service-testing` is installed (entry point `pytest11`).

Fixtures (each starts real processes on loopback and stops them at teardown):
- `echo_service(env=..., wait_ready=True, data_dir=None)`: the echo service
  (`model_service_testing.echo`), per test;
- `comfy_standin(models=..., knobs=..., video_encoder=...)`: the stand-in ComfyUI, per
  module;
- `comfy_service(name, standin, env=...)`: a ComfyUI service (`model-service serve NAME`)
  whose backend is that stand-in (`COMFYUI_URL`), per module;
- `tiny_comfy_service(name, env=...)`: a ComfyUI service launching the real ComfyUI of
  `COMFYUI_TEST_DIR` on tiny weights, per module (skips without one);
- `redis_server`: a real redis-server, per test;
- `browser`: headless Chromium under Playwright, per module.

`--only-machine-skips` (what `make test` passes) fails the run when a test skips for
anything but what the machine lacks (`machine.MACHINE_SKIPS`); the summary lists every
skip reason with its count either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from model_service_testing import machine
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.hub_standin import Server, serve
from model_service_testing.process import (
    RedisServer,
    ServiceProcess,
    browser_missing,
    chromium,
    tiny_comfy_process,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

StartEcho = Callable[..., ServiceProcess]
StartStandin = Callable[..., StandinProcess]
StartComfyService = Callable[..., ServiceProcess]

ECHO_MODULE = "model_service_testing.echo.serve"
ECHO_ENV = {"JOB_TIMEOUT_S": "60", "CANCEL_GRACE_S": "2"}


def echo_process(data_dir: Path, env: dict[str, str] | None = None) -> ServiceProcess:
    """The echo service (`steps`, `step_s`, `behaviour`, `image`, `text`), not started."""
    return ServiceProcess(ECHO_MODULE, data_dir, env={**ECHO_ENV, **(env or {})})


@pytest.fixture
def echo_service(tmp_path: Path) -> Iterator[StartEcho]:
    """Start the echo service (kill -9-able, one process group); stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(
        env: dict[str, str] | None = None, wait_ready: bool = True, data_dir: Path | None = None
    ) -> ServiceProcess:
        service = echo_process(data_dir or tmp_path / "data", env)
        started.append(service)
        return service.start(wait_ready=wait_ready)

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def comfy_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartStandin]:
    """Start a stand-in ComfyUI (validating against the pinned ComfyUI's node schema)."""
    started: list[StandinProcess] = []

    def start(**kwargs: Any) -> StandinProcess:
        process = StandinProcess(tmp_path_factory.mktemp("comfy") / "base", **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def comfy_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartComfyService]:
    """Start `model-service serve NAME` with a stand-in ComfyUI as its backend."""
    started: list[ServiceProcess] = []

    def start(
        name: str, standin: StandinProcess, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        process = ServiceProcess(
            "model_service.cli",
            tmp_path_factory.mktemp(f"{name}-data"),
            env={"COMFYUI_URL": standin.url, **(env or {})},
            args=["serve", name],
        )
        started.append(process)
        return process.start(timeout=60)

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def tiny_comfy_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartComfyService]:
    """Start `model-service serve NAME` in PROFILE=tiny on the real ComfyUI of
    COMFYUI_TEST_DIR (skips without one)."""
    started: list[ServiceProcess] = []

    def start(name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        if machine.COMFYUI_TEST_DIR is None:
            pytest.skip(machine.WHY_NO_REAL_COMFYUI)
        root = tmp_path_factory.mktemp(f"{name}-tiny")
        process = tiny_comfy_process(root, name, machine.COMFYUI_TEST_DIR, env)
        started.append(process)
        return process.start(timeout=300)

    yield start
    for process in started:
        process.stop()


if TYPE_CHECKING:
    from model_service_testing.sigma_probe import SigmaLog

ProbedService = tuple[ServiceProcess, "SigmaLog"]


@pytest.fixture(scope="module")
def start_probed_service(
    tiny_comfy_service: StartComfyService, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], ProbedService]:
    """`start(NAME)`: the tiny service on a real ComfyUI that records the σ of every model
    call (`sigma_probe`), and the log of them."""
    from model_service_testing.sigma_probe import probe_env

    def start(name: str) -> ProbedService:
        env, log = probe_env(tmp_path_factory.mktemp("sigma-probe"))
        return tiny_comfy_service(name, env), log

    return start


@pytest.fixture(scope="module")
def hub() -> Iterator[Server]:
    """A Hugging Face Hub look-alike and plain file server on loopback (model files, LoRAs)."""
    with serve() as running:
        yield running


@pytest.fixture
def hub_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub may call the Hub look-alike from this process: some test modules set
    HF_HUB_OFFLINE=1 at import (for their own pipelines), and huggingface_hub reads it once,
    at its own import, whichever module collected first."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (`make redis` provides the binary)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium (`make chromium`) under Playwright, per module: Playwright's sync
    API holds an event loop on the thread, so `asyncio.run` fails in tests while it lives."""
    missing = browser_missing()
    if missing:
        pytest.fail(missing)
    with chromium() as instance:
        yield instance


# --- the skip policy --------------------------------------------------------------------

_SKIPS: Counter[str] = Counter()  # skip reason -> tests skipped for it, this run


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--only-machine-skips",
        action="store_true",
        help="fail the run when a test skips for anything but a missing GPU or real ComfyUI",
    )


def pytest_configure(config: pytest.Config) -> None:
    _SKIPS.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPS[reason.removeprefix("Skipped: ")] += 1


def _not_allowed() -> dict[str, int]:
    return {reason: n for reason, n in _SKIPS.items() if not machine.is_machine_skip(reason)}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if config.getoption("--only-machine-skips") and _not_allowed() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not _SKIPS:
        return
    terminalreporter.section("skips by reason")
    for reason, count in _SKIPS.most_common():
        kind = "machine" if machine.is_machine_skip(reason) else "NOT ALLOWED"
        terminalreporter.write_line(f"{count:5d}  [{kind}] {reason}")
    if config.getoption("--only-machine-skips") and _not_allowed():
        terminalreporter.write_line(
            "--only-machine-skips: a test may skip only for a missing GPU or real ComfyUI "
            f"({', '.join(machine.MACHINE_SKIPS)}); the run fails",
            red=True,
        )
