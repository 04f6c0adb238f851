"""Real processes for tests: a service on loopback (`ServiceProcess`), redis-server, Chromium."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

from model_service.provision.manifest import ModelFile

if TYPE_CHECKING:
    from playwright.sync_api import Browser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """A service started as `python -m <module>` with uvicorn on 127.0.0.1."""

    def __init__(
        self,
        module: str,
        data_dir: Path,
        env: dict[str, str] | None = None,
        pythonpath: list[str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.module = module
        self.args = args or []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}-service.log"
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "DATA_DIR": str(data_dir),
            "LOG_FORMAT": "json",
            "WARMUP": "0",  # the ComfyUI services' warm-up: on only in the tests of it
            **(env or {}),
        }
        if pythonpath:
            self.env["PYTHONPATH"] = os.pathsep.join([*pythonpath, self.env.get("PYTHONPATH", "")])
        self.proc: subprocess.Popen[bytes] | None = None
        self.headers: dict[str, str] = {}

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> ServiceProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", self.module, *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_for("/health", timeout)
        if wait_ready:
            self.wait_for("/ready", timeout)
        return self

    def wait_for(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"service exited early; log:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not 200 after {timeout}s; log:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def kill9(self) -> None:
        """kill -9 of the whole service: API process and its worker (one process group)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def worker_pids(self) -> list[int]:
        """Child processes of the API process (the model worker)."""
        if self.proc is None:
            return []
        out = subprocess.run(  # noqa: S603
            ["pgrep", "-f", "spawn_main", "-P", str(self.proc.pid)],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(pid) for pid in out.split()]


def watch_ready(service: ServiceProcess, timeout: float = 60.0) -> list[dict[str, Any]]:
    """`/ready`'s answers until 200 (the last), one per change of status or stage, each
    with its `status` code added."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(service.url + "/ready", timeout=5)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        body = {**response.json(), "status": response.status_code}
        if not seen or (seen[-1]["status"], seen[-1].get("stage")) != (
            body["status"],
            body.get("stage"),
        ):
            seen.append(body)
        if response.status_code == 200:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"/ready not 200 after {timeout} s: {seen[-3:]}; {service.log()[-3000:]}")


def start_warming(
    name: str, standin_url: str, models_dir: Path, data_dir: Path, files: Iterable[ModelFile]
) -> ServiceProcess:
    """ComfyUI service `name` on a ComfyUI at `standin_url`, its model files in place and
    WARMUP=1, started without waiting for /ready (watch it with `watch_ready`)."""
    place_sparse_models(models_dir, files)
    return ServiceProcess(
        "model_service.cli",
        data_dir,
        env={"COMFYUI_URL": standin_url, "MODELS_DIR": str(models_dir), "WARMUP": "1"},
        args=["serve", name],
    ).start(wait_ready=False)


def run_waiting(client: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    """`POST /v1/jobs` with `Prefer: wait=60`: the job once it ended (HTTP 200)."""
    response = client.post("/v1/jobs", json={"input": payload}, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_status(
    client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("status") in statuses:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not in {statuses} after {timeout}s: {job}")


def wait_started(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Until the engine has begun the job (`running` alone may be a job taken ahead,
    waiting behind another)."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("status") == "running" and (job.get("timings") or {}).get("started_at"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not started after {timeout}s: {job}")


def place_sparse_models(models_dir: Path, files: Iterable[ModelFile]) -> None:
    """Each manifest file as a sparse file of its real size: "downloaded" for the
    services' start-up checks (sizes only), costing no disk."""
    for file in files:
        path = file.path(models_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            out.truncate(file.size_bytes)


def tiny_comfy_process(
    root: Path, service: str, comfyui_dir: str, env: dict[str, str] | None = None
) -> ServiceProcess:
    """A ComfyUI service in PROFILE=tiny launching the real ComfyUI at `comfyui_dir` (with
    COMFYUI_TEST_PYTHON as its interpreter when set); not started yet."""
    settings = {
        "PROFILE": "tiny",
        "COMFYUI_DIR": comfyui_dir,
        "COMFYUI_PORT": str(free_port()),
        "MODELS_DIR": str(root / "models"),
        **(env or {}),
    }
    if os.environ.get("COMFYUI_TEST_PYTHON"):
        settings["COMFYUI_PYTHON"] = os.environ["COMFYUI_TEST_PYTHON"]
    return ServiceProcess("model_service.cli", root / "data", env=settings, args=["serve", service])


REDIS_SERVER = (
    Path(__file__).resolve().parents[4] / "build" / "redis" / "redis-server"
)  # make redis


class RedisServer:
    """A real redis-server on a free loopback port (the one `make redis` provides, or the
    one on PATH), its data in `root`; `restart()` keeps the data (append-only file)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        if REDIS_SERVER.is_file():
            return str(REDIS_SERVER)
        return shutil.which("redis-server")

    def start(self) -> RedisServer:
        binary = self.binary()
        if binary is None:
            raise RuntimeError("no redis-server: run `make redis` (scripts/redis_server.sh)")
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "redis.log").open("ab") as log:  # the child keeps its own copy
            self.proc = self._launch(binary, log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"redis-server did not listen on {self.port}")

    def _launch(self, binary: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root)]
        argv += ["--appendonly", "yes", "--save", "", "--protected-mode", "no"]
        return subprocess.Popen(  # noqa: S603
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Browser tests of the web console: a Chromium (`make chromium`) driven by Playwright for
# Python (requirements-test.txt): Debian's package, or on Ubuntu Playwright's own download.
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
PLAYWRIGHT_BROWSERS = Path(
    os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache" / "ms-playwright"
)
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_executable() -> Path | None:
    """The system's Chromium (CHROMIUM_PATH, Debian's), else Playwright's own, else None."""
    if CHROMIUM.is_file():
        return CHROMIUM
    found = sorted(PLAYWRIGHT_BROWSERS.glob("chromium-*/chrome-linux*/chrome"))
    return found[-1] if found else None


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if chromium_executable() is None:
        return f"no {CHROMIUM} and no Playwright Chromium: run `make chromium`"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: pip install -r requirements-test.txt"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium (`chromium_executable`) under Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium_executable()), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()
