"""The ComfyUI supervisor, with the stand-in (a real process) playing ComfyUI.

Launched mode runs `python -m model_service_testing.comfy_standin` (or a fake ComfyUI checkout
whose main.py becomes the stand-in) as the child; external mode watches a stand-in
started beside it. Kills are real signals; orphans are checked with `os.kill(pid, 0)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml
from structlog.testing import capture_logs

from model_service.comfy.supervisor import (
    MODEL_FOLDERS,
    ComfyState,
    ComfySupervisor,
    LaunchSpec,
    LevelGuess,
    clean_line,
    extra_model_paths_yaml,
    launch_spec_from_settings,
)
from model_service.settings import Settings
from model_service_testing.comfy_standin import OBJECT_INFO, StandinProcess
from model_service_testing.process import free_port

FAST: dict[str, Any] = {
    "backoff_s": (0.3, 0.6, 1.0),
    "poll_interval_s": 0.05,
    "stop_grace_s": 5.0,
    "start_timeout_s": 30.0,
}

# A fake ComfyUI checkout: main.py takes ComfyUI's flags, starts a helper process (as
# ComfyUI's own children would be), records what it got, then becomes the stand-in.
FAKE_MAIN = """
import argparse, json, os, runpy, subprocess, sys
from pathlib import Path

parser = argparse.ArgumentParser()
for flag in ("--listen", "--port", "--output-directory", "--input-directory",
             "--temp-directory", "--user-directory", "--database-url"):
    parser.add_argument(flag, required=True)
parser.add_argument("--extra-model-paths-config", action="append", required=True)
parser.add_argument("--disable-auto-launch", action="store_true")
parser.add_argument("--cpu", action="store_true")
args, extra = parser.parse_known_args()
assert os.path.isdir(args.user_directory), "ComfyUI refuses a missing --user-directory"
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
record = {"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "helper": helper.pid,
          "extra": extra, "cpu": args.cpu, "api_keys": os.environ.get("API_KEYS"),
          "unbuffered": os.environ.get("PYTHONUNBUFFERED")}
Path("launched.json").write_text(json.dumps(record))
sys.argv = ["standin", "--listen", args.listen, "--port", args.port,
            "--base-dir", os.path.join(args.temp_directory, "standin"),
            "--object-info", OBJECT_INFO]
runpy.run_module("model_service_testing.comfy_standin", run_name="__main__", alter_sys=True)
"""


def standin_spec(tmp_path: Path, port: int | None = None) -> LaunchSpec:
    port = port or free_port()
    argv = [sys.executable, "-m", "model_service_testing.comfy_standin", "--port", str(port)]
    argv += ["--base-dir", str(tmp_path / "standin"), "--object-info", str(OBJECT_INFO)]
    return LaunchSpec(argv=tuple(argv), port=port)


def fake_comfyui(tmp_path: Path) -> Path:
    comfy_dir = tmp_path / "ComfyUI"
    comfy_dir.mkdir()
    (comfy_dir / "main.py").write_text(f"OBJECT_INFO = {str(OBJECT_INFO)!r}\n{FAKE_MAIN}")
    return comfy_dir


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


@contextlib.asynccontextmanager
async def supervised(supervisor: ComfySupervisor) -> AsyncIterator[ComfySupervisor]:
    """Started, and stopped even when the test fails (nothing is left running)."""
    await supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.stop()


async def until(check: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def comfy_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Structured log entries, with the stdlib logger name (`logger`) on each."""
    old = structlog.get_config()
    structlog.configure(
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    try:
        with capture_logs(processors=[structlog.stdlib.add_logger_name]) as entries:
            yield entries
    finally:
        structlog.configure(
            logger_factory=old["logger_factory"], wrapper_class=old["wrapper_class"]
        )


# --- configuration ----------------------------------------------------------------


def test_extra_model_paths_yaml_parses_and_points_every_folder_at_models_dir(
    tmp_path: Path,
) -> None:
    models = tmp_path / "my models" / 'odd "name": #1'
    config = yaml.safe_load(extra_model_paths_yaml(models))
    assert list(config) == ["model_service"]
    section = dict(config["model_service"])
    assert section.pop("base_path") == str(models)
    assert section.pop("is_default") is True
    assert list(section) == list(MODEL_FOLDERS)
    assert {"checkpoints", "diffusion_models", "text_encoders", "vae", "loras"} <= set(section)
    for folder, relative in section.items():  # as ComfyUI's load_extra_path_config joins
        assert [os.path.join(str(models), line) for line in relative.split("\n")] == [
            str(models / folder)
        ]


def test_launch_spec_from_settings_builds_comfyui_command(tmp_path: Path) -> None:
    comfy_dir = fake_comfyui(tmp_path)
    settings = Settings(
        comfyui_dir=comfy_dir,
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "models",
        comfyui_port=8190,
        comfyui_args="--preview-method none --reserve-vram '1.5'",
        profile="tiny",
    )
    spec = launch_spec_from_settings(settings)
    root = tmp_path / "data" / "comfyui"
    assert spec.problem is None
    assert spec.cwd == comfy_dir
    assert spec.url == "http://127.0.0.1:8190"
    assert spec.argv[:2] == (sys.executable, "main.py")
    argv = list(spec.argv)
    for flag, value in [
        ("--listen", "127.0.0.1"),
        ("--port", "8190"),
        ("--extra-model-paths-config", str(root / "extra_model_paths.yaml")),
        ("--output-directory", str(root / "output")),
        ("--input-directory", str(root / "input")),
        ("--temp-directory", str(root)),
        ("--user-directory", str(root / "user")),
        ("--database-url", f"sqlite:///{root / 'user' / 'comfyui.db'}"),
    ]:
        assert argv[argv.index(flag) + 1] == value
    assert "--disable-auto-launch" in argv
    assert "--cpu" in argv  # PROFILE=tiny
    assert argv[-4:] == ["--preview-method", "none", "--reserve-vram", "1.5"]
    assert spec.files == {
        root / "extra_model_paths.yaml": extra_model_paths_yaml(tmp_path / "models")
    }
    spec.prepare()
    assert (root / "user").is_dir()
    assert (root / "extra_model_paths.yaml").is_file()

    on_gpu = settings.model_copy(update={"profile": "full", "comfyui_python": sys.executable})
    assert "--cpu" not in launch_spec_from_settings(on_gpu, cpu=False).argv
    missing = settings.model_copy(update={"comfyui_python": str(tmp_path / "no-python")})
    assert launch_spec_from_settings(missing).problem == (
        f"COMFYUI_PYTHON={tmp_path / 'no-python'} is not an executable"
    )


def test_comfyui_dir_without_main_py_is_a_clear_readiness_reason(tmp_path: Path) -> None:
    async def main() -> None:
        empty = tmp_path / "not-comfy"
        empty.mkdir()
        supervisor = ComfySupervisor.from_settings(
            Settings(comfyui_dir=empty, data_dir=tmp_path / "data")
        )
        await supervisor.start()
        expected = (
            f"COMFYUI_DIR={empty} has no main.py; point it at a ComfyUI checkout (v0.33.0 or newer)"
        )
        assert supervisor.state is ComfyState.FAILED
        assert supervisor.readiness == (False, expected)
        assert not await supervisor.wait_ready(0.1)
        await supervisor.stop()
        assert supervisor.state is ComfyState.FAILED

        unset = ComfySupervisor.from_settings(Settings(data_dir=tmp_path / "data"))
        await unset.start()
        assert unset.state is ComfyState.FAILED
        assert unset.reason.startswith("COMFYUI_DIR is not set;")
        assert "COMFYUI_URL" in unset.reason

    run(main)


def test_level_guess_and_line_cleaning() -> None:
    guess = LevelGuess()
    lines = [
        ("Starting server", "info"),
        ("2025-05-01 10:00:00,123 WARNING comfy.standin: invalid prompt", "warning"),
        ("WARNING: this card most likely does not support cuda-malloc", "warning"),
        ("!!! Exception during processing !!! CUDA error: an illegal memory access", "error"),
        ("Traceback (most recent call last):", "error"),
        ('  File "/ComfyUI/execution.py", line 496, in execute', "error"),
        ("    output_data = get_output_data(obj, input_data_all)", "error"),
        ("torch.OutOfMemoryError: Allocation on device", "error"),
        ("Prompt executed in 2.31 seconds", "debug"),  # per prompt: at debug
        ("got prompt", "debug"),
        ("[INFO] got prompt", "debug"),  # ComfyUI 0.33's own format
        ("[INFO] Prompt executed in 0.01 seconds", "debug"),
        ("Prompt executed in 2.31 seconds, then an error", "error"),
    ]
    assert [guess(line) for line, _ in lines] == [level for _, level in lines]
    bar = b"  5%|#         | 1/20\r 50%|#####     | 10/20\r100%|##########| 20/20 [00:05]"
    assert clean_line(bar) == "100%|##########| 20/20 [00:05]"
    assert clean_line(b"\x1b[32mgot prompt\x1b[0m  ") == "got prompt"


# --- launched mode ------------------------------------------------------------------


def test_launched_from_settings_becomes_ready_and_stop_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_KEYS", "our-secret")  # not ComfyUI's business
    comfy_dir = fake_comfyui(tmp_path)
    settings = Settings(
        comfyui_dir=comfy_dir,
        comfyui_port=free_port(),
        comfyui_args="--preview-method none",
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "models",
        profile="tiny",
    )

    async def main() -> None:
        supervisor = ComfySupervisor.from_settings(settings, **FAST)
        assert supervisor.url == f"http://127.0.0.1:{settings.comfyui_port}"
        async with supervised(supervisor):
            assert supervisor.state is ComfyState.STARTING
            assert await supervisor.wait_ready(30), supervisor.reason
            assert supervisor.readiness == (True, "ready")
            assert supervisor.info["system"]["comfyui_version"] == "0.33.0"
            record = json.loads((comfy_dir / "launched.json").read_text())
            assert record["pid"] == supervisor.pid
            assert record["cwd"] == str(comfy_dir)
            assert record["cpu"] is True
            assert record["extra"] == ["--preview-method", "none"]
            assert record["api_keys"] is None
            assert record["unbuffered"] == "1"
            paths_yaml = tmp_path / "data" / "comfyui" / "extra_model_paths.yaml"
            paths = yaml.safe_load(paths_yaml.read_text())
            assert paths["model_service"]["base_path"] == str(tmp_path / "models")
            pid, helper = record["pid"], record["helper"]
            assert alive(pid)
            assert alive(helper)

            await supervisor.stop()
            assert supervisor.state is ComfyState.STOPPED
            assert supervisor.pid is None
            await until(lambda: not alive(pid) and not alive(helper), 5, "the group to go")
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)  # nothing is left in ComfyUI's process group

    run(main)


def test_kill_9_restarts_with_a_reason_and_growing_backoff(tmp_path: Path) -> None:
    crashes: list[str] = []
    restarts: list[str] = []

    async def main() -> None:
        async with supervised(
            ComfySupervisor(
                standin_spec(tmp_path), on_crash=crashes.append, on_restart=restarts.append, **FAST
            )
        ) as supervisor:
            assert await supervisor.wait_ready(30), supervisor.reason
            first = supervisor.pid
            assert first is not None

            os.kill(first, signal.SIGKILL)
            await until(lambda: supervisor.state is ComfyState.RESTARTING, what="restarting")
            ready, reason = supervisor.readiness
            assert not ready
            assert reason.startswith("ComfyUI restarting after it exited with code -9 (SIGKILL")
            assert "next try in 0.3 s" in reason
            assert len(crashes) == 1
            assert "exited with code -9" in crashes[0]
            assert restarts == ["crashed"]
            assert await supervisor.wait_ready(30), supervisor.reason
            second = supervisor.pid
            assert second is not None
            assert second != first
            assert not alive(first)
            async with httpx.AsyncClient(trust_env=False) as client:
                assert (await client.get(supervisor.url + "/system_stats")).status_code == 200

            os.kill(second, signal.SIGKILL)  # again, soon after: the pause grows
            await until(lambda: supervisor.state is ComfyState.RESTARTING, what="restarting")
            assert "next try in 0.6 s" in supervisor.reason
            assert await supervisor.wait_ready(30), supervisor.reason
            assert supervisor.restarts == 2
            assert len(crashes) == 2

    run(main)


def test_restart_on_request_replaces_the_process_at_once(tmp_path: Path) -> None:
    crashes: list[str] = []
    restarts: list[str] = []

    async def main() -> None:
        async with supervised(
            ComfySupervisor(
                standin_spec(tmp_path), on_crash=crashes.append, on_restart=restarts.append, **FAST
            )
        ) as supervisor:
            assert await supervisor.wait_ready(30), supervisor.reason
            first = supervisor.pid
            assert first is not None
            await supervisor.restart("CUDA error: an illegal memory access was encountered")
            assert not alive(first)
            assert supervisor.state is ComfyState.RESTARTING
            assert "CUDA error: an illegal memory access" in supervisor.reason
            assert await supervisor.wait_ready(30), supervisor.reason
            assert supervisor.pid not in (None, first)
            assert crashes == []  # the engine asked for it; it already failed its job
            assert restarts == ["requested"]

    run(main)


def test_a_bug_in_the_supervisor_is_survived(tmp_path: Path) -> None:
    """A bug in the supervising loop (here: handling a process's end raising once) is
    logged, what it launched is stopped, and it starts over: ready again, no restart."""

    async def main() -> None:
        supervisor = ComfySupervisor(standin_spec(tmp_path), **FAST)
        after = supervisor._after
        calls = []

        async def buggy(run: Any) -> None:
            calls.append(run)
            if len(calls) == 1:
                raise RuntimeError("a bug after the process ended")
            await after(run)

        supervisor._after = buggy  # type: ignore[method-assign]
        async with supervised(supervisor):
            assert await supervisor.wait_ready(30), supervisor.reason
            first = supervisor.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await until(lambda: "a bug after the process ended" in supervisor.reason, what="bug")
            assert supervisor.state is ComfyState.RESTARTING
            assert await supervisor.wait_ready(30), supervisor.reason
            assert supervisor.pid not in (None, first)

    run(main)


def test_crash_loop_backs_off_longer_each_time(
    tmp_path: Path, comfy_logs: list[MutableMapping[str, Any]]
) -> None:
    crashes: list[str] = []
    restart_times: list[float] = []
    code = (
        "import sys; print('Total VRAM 0 MB'); "
        "print('RuntimeError: Found no NVIDIA driver on your system', file=sys.stderr); "
        "sys.exit(3)"
    )
    spec = LaunchSpec(argv=(sys.executable, "-c", code), port=free_port())

    async def main() -> None:
        async with supervised(
            ComfySupervisor(
                spec,
                on_crash=crashes.append,
                on_restart=lambda label: restart_times.append(time.monotonic()),
                **{**FAST, "backoff_s": (0.1, 0.2, 0.4, 0.8)},
            )
        ) as supervisor:
            await until(lambda: supervisor.restarts >= 4, 15, "four restarts")
            assert supervisor.state is ComfyState.RESTARTING
            assert supervisor.reason.startswith(
                "ComfyUI restarting after it exited with code 3 while starting; its last "
                "output: RuntimeError: Found no NVIDIA driver on your system"
            )
        assert supervisor.state is ComfyState.STOPPED

    run(main)
    pause = "ComfyUI starts again after a pause"
    assert [e["delay_s"] for e in comfy_logs if e["event"] == pause][:4] == [0.1, 0.2, 0.4, 0.8]
    gaps = [later - earlier for earlier, later in itertools.pairwise(restart_times)]
    assert gaps[0] >= 0.1
    assert gaps[1] >= 0.2
    assert gaps[2] >= 0.4
    assert crashes == []  # never ready: no job can have been running


def test_comfyui_output_lines_reach_our_logger(
    tmp_path: Path, comfy_logs: list[MutableMapping[str, Any]]
) -> None:
    def from_comfy(text: str) -> list[MutableMapping[str, Any]]:
        return [e for e in comfy_logs if e["logger"] == "comfyui" and text in e["event"]]

    async def main() -> None:
        async with supervised(ComfySupervisor(standin_spec(tmp_path), **FAST)) as supervisor:
            assert await supervisor.wait_ready(30), supervisor.reason
            bad = {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}
            async with httpx.AsyncClient(trust_env=False) as client:
                response = await client.post(supervisor.url + "/prompt", json=bad)
            assert response.status_code == 400
            await until(lambda: bool(from_comfy("invalid prompt")), 10, "the warning line")
            [warning] = from_comfy("invalid prompt")
            assert warning["log_level"] == "warning"
            assert warning["stream"] == "stderr"
            assert warning["pid"] == supervisor.pid
            [banner] = from_comfy("To see the GUI go to")
            assert banner["log_level"] == "info"
            assert banner["stream"] == "stdout"
            ready = [e for e in comfy_logs if e["event"] == "ComfyUI ready"]
            assert ready[0]["logger"] == "model_service.comfy"

    run(main)


def test_busy_port_is_reported_and_nothing_is_launched(tmp_path: Path) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            async with supervised(
                ComfySupervisor(standin_spec(tmp_path, port), **FAST)
            ) as supervisor:
                await until(lambda: "already in use" in supervisor.reason, 5, "the reason")
                assert supervisor.state is ComfyState.RESTARTING
                assert f"127.0.0.1:{port} is already in use" in supervisor.reason
                assert "COMFYUI_PORT" in supervisor.reason
                assert supervisor.pid is None

    run(main)


def test_comfyui_dies_with_the_service(tmp_path: Path) -> None:
    """kill -9 of the service leaves no ComfyUI holding the port and the GPU."""
    script = (
        "import asyncio, sys\n"
        "from model_service.comfy.supervisor import ComfySupervisor, LaunchSpec\n"
        "async def main():\n"
        "    spec = LaunchSpec(argv=tuple(sys.argv[2:]), port=int(sys.argv[1]))\n"
        "    supervisor = ComfySupervisor(spec)\n"
        "    await supervisor.start()\n"
        "    assert await supervisor.wait_ready(30), supervisor.reason\n"
        "    print('PID', supervisor.pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    spec = standin_spec(tmp_path)
    service = subprocess.Popen(
        [sys.executable, "-c", script, str(spec.port), *spec.argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    child = None
    try:
        assert service.stdout is not None
        line = b""
        while not line.startswith(b"PID "):  # its own log lines come first
            line = service.stdout.readline()
            assert line, "the service script ended early"
        child = int(line.split()[1])
        assert alive(child)
        service.kill()
        service.wait(10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child)
    finally:
        service.kill()
        service.wait(10)
        service.stdout.close()
        if child is not None and alive(child):
            os.killpg(child, signal.SIGKILL)  # do not leave it behind when the test fails


# --- external mode ------------------------------------------------------------------


def test_external_url_is_only_watched(tmp_path: Path) -> None:
    crashes: list[str] = []
    standin = StandinProcess(tmp_path / "external")  # its port, not started yet
    supervisor = ComfySupervisor(
        url=standin.url + "/",
        on_crash=crashes.append,
        poll_interval_s=0.05,
        health_interval_s=0.1,
        unhealthy_after=2,
    )
    assert supervisor.external
    assert supervisor.url == standin.url

    async def main() -> None:
        async with supervised(supervisor):
            await asyncio.sleep(0.3)
            ready, reason = supervisor.readiness
            assert not ready
            assert supervisor.state is ComfyState.STARTING
            assert reason.startswith(f"waiting for ComfyUI at {standin.url}: ")

            await asyncio.to_thread(standin.start)
            assert await supervisor.wait_ready(10), supervisor.reason
            assert supervisor.pid is None  # not ours
            await supervisor.restart("CUDA error")  # not ours to restart: no effect
            assert supervisor.ready

            await asyncio.to_thread(standin.stop)
            await until(lambda: supervisor.state is ComfyState.RESTARTING, 10, "not answering")
            assert supervisor.reason.startswith(f"ComfyUI at {standin.url} stopped answering")
            assert len(crashes) == 1

    try:
        run(main)
    finally:
        standin.stop()
