"""Keeps ComfyUI running for a service, or watches one that runs elsewhere.

Two modes, chosen by the settings (`ComfySupervisor.from_settings`):

- **External** (`COMFYUI_URL` set): nothing is launched; `GET /system_stats` is polled
  and `/ready` reports whether it answers.
- **Launched** (`COMFYUI_DIR`): `python main.py --listen 127.0.0.1 --port ...` runs as a
  child process in its own process group, with its model folders pointed at
  `MODELS_DIR` (a generated `extra_model_paths.yaml`) and its input, output, temp and
  user folders under `DATA_DIR/comfyui`. Each line it prints becomes one structured log
  line (logger `comfyui`, level guessed from the text; `listen()` lets the engine hear
  them too). It is ready once
  `GET /system_stats` answers; when it dies it is started again after a growing delay
  (1, 2, 5, 10, 30 s; the count starts over once it has stayed up a minute), and the
  engine's `on_crash` hook hears about it so the job it was running fails with
  `backend_crashed`. `restart(reason)` replaces it on purpose (a CUDA error poisons the
  process). `stop()` sends SIGTERM to the whole group, then SIGKILL after a grace.
  The kernel kills it if the service itself dies (PR_SET_PDEATHSIG, Linux), a port
  already taken is reported instead of launching into it, and the service's own
  secrets (`API_KEYS`, `WEBHOOK_SECRET`) are not passed on to it.

The launch is a `LaunchSpec` (argv, port, folders to create, files to write), so tests
launch the ComfyUI stand-in in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from model_service import gpu
from model_service.exits import signal_name, was_killed
from model_service.logs import get_logger
from model_service.settings import Settings

log = get_logger("model_service.comfy")
comfy_log = get_logger("comfyui")  # ComfyUI's own output, one line per line it prints

MODEL_FOLDERS = (
    "checkpoints",
    "diffusion_models",
    "text_encoders",
    "clip_vision",
    "vae",
    "loras",
    "audio_encoders",
    "model_patches",
    "upscale_models",
)
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
MIN_COMFYUI_VERSION = "v0.33.0"
# The service's own secrets; ComfyUI (and any custom node in it) has no use for them.
_SECRET_ENV = ("API_KEYS", "WEBHOOK_SECRET")
_MAX_LINE_BYTES = 16 * 1024
_REASON_LINE_CHARS = 300


class ComfyState(StrEnum):
    STARTING = "starting"  # launched (or waiting for the external server), not answering yet
    READY = "ready"  # GET /system_stats answers
    RESTARTING = "restarting"  # it died (or stopped answering); a new one is on its way
    FAILED = "failed"  # cannot be started at all (configuration); `reason` says what to fix
    STOPPED = "stopped"  # stop() was called


# --- what to launch ------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """One way to start "ComfyUI": the real one from settings, or the stand-in in tests."""

    argv: tuple[str, ...]
    port: int
    host: str = "127.0.0.1"
    cwd: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # on top of our own environment
    dirs: tuple[Path, ...] = ()  # created before each launch
    files: Mapping[Path, str] = field(default_factory=dict)  # written before each launch
    problem: str | None = None  # why it cannot be launched at all; the supervisor fails
    output_dir: Path | None = None  # ComfyUI's `--output-directory`, when we chose it

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> None:
        for path in self.dirs:
            path.mkdir(parents=True, exist_ok=True)
        for path, text in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def extra_model_paths_yaml(
    models_dir: Path, folders: Sequence[str] = MODEL_FOLDERS, name: str = "model_service"
) -> str:
    """ComfyUI's `extra_model_paths.yaml`: each model folder under `models_dir`.

    Same layout as ComfyUI's `extra_model_paths.yaml.example` (`base_path` plus one
    `folder: relative/path` line per folder); `is_default: true` puts these folders first
    in ComfyUI's search order. Strings are JSON-quoted, which YAML reads as they are.
    """
    lines = [
        "# Written by model_service at each ComfyUI start; edits are overwritten.",
        f"{name}:",
        f"    base_path: {json.dumps(str(models_dir))}",
        "    is_default: true",
        *(f"    {folder}: {json.dumps(folder)}" for folder in folders),
    ]
    return "\n".join(lines) + "\n"


def launch_spec_from_settings(settings: Settings, *, cpu: bool | None = None) -> LaunchSpec:
    """`<COMFYUI_PYTHON> main.py ...` in `COMFYUI_DIR`, its folders under DATA_DIR/comfyui.

    `cpu` adds `--cpu`; by default when PROFILE=tiny or no NVIDIA GPU is visible.
    ComfyUI runs with its own working directory, so every path it gets is absolute.
    """
    port = settings.comfyui_port
    if settings.comfyui_dir is None:
        problem = (
            "COMFYUI_DIR is not set; point it at a ComfyUI checkout "
            f"({MIN_COMFYUI_VERSION} or newer), or set COMFYUI_URL to use a running ComfyUI"
        )
        return LaunchSpec(argv=(), port=port, problem=problem)
    comfy_dir = settings.comfyui_dir.absolute()
    if not (comfy_dir / "main.py").is_file():
        problem = (
            f"COMFYUI_DIR={settings.comfyui_dir} has no main.py; point it at a ComfyUI "
            f"checkout ({MIN_COMFYUI_VERSION} or newer)"
        )
        return LaunchSpec(argv=(), port=port, cwd=comfy_dir, problem=problem)
    python = settings.comfyui_python or sys.executable
    if settings.comfyui_python and not _is_executable(settings.comfyui_python):
        problem = f"COMFYUI_PYTHON={settings.comfyui_python} is not an executable"
        return LaunchSpec(argv=(), port=port, cwd=comfy_dir, problem=problem)
    if cpu is None:
        cpu = settings.profile == "tiny" or not _has_gpu()
    root = settings.data_dir.absolute() / "comfyui"
    paths_yaml = root / "extra_model_paths.yaml"
    output, inputs, user = root / "output", root / "input", root / "user"
    argv = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port)]
    argv += ["--disable-auto-launch"]
    if cpu:
        argv += ["--cpu"]
    argv += ["--extra-model-paths-config", str(paths_yaml)]
    argv += ["--output-directory", str(output), "--input-directory", str(inputs)]
    argv += ["--temp-directory", str(root)]  # ComfyUI appends "temp" (and empties it)
    argv += ["--user-directory", str(user)]  # must exist: created by prepare()
    # ComfyUI keeps its database in its install folder unless told: keep it ours too
    argv += ["--database-url", f"sqlite:///{user / 'comfyui.db'}"]
    argv += shlex.split(settings.comfyui_args or "")
    return LaunchSpec(
        argv=tuple(argv),
        port=port,
        cwd=comfy_dir,
        dirs=(output, inputs, root / "temp", user, settings.models_dir.absolute()),
        files={paths_yaml: extra_model_paths_yaml(settings.models_dir.absolute())},
        output_dir=output,
    )


def _is_executable(program: str) -> bool:
    return shutil.which(program) is not None


def _has_gpu() -> bool:
    return bool(gpu.probe())


# --- ComfyUI's output as log lines -----------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")
_ERROR_WORDS = re.compile(r"\b(error|exception|failed|fatal)\b|^!!!", re.IGNORECASE)
_WARNING_WORDS = re.compile(r"\bwarn(ing)?\b|deprecat", re.IGNORECASE)
# ComfyUI's two lines per prompt: at debug, like our own per-job lines
_PER_PROMPT = re.compile(r"^(\[INFO\] )?(got prompt|Prompt executed in [\d.]+ seconds)$")
_LEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warning",
    "WARN": "warning",
    "ERROR": "error",
    "CRITICAL": "critical",
    "FATAL": "critical",
}


def clean_line(raw: bytes) -> str:
    """One printed line as text: the last state of a `\\r` progress bar, no colours."""
    text = raw.decode(errors="replace")
    if "\r" in text:
        parts = [part for part in text.split("\r") if part.strip()]
        text = parts[-1] if parts else ""
    return _ANSI.sub("", text).rstrip()


class LevelGuess:
    """ComfyUI prints plain lines; this guesses each one's level. A Python traceback is
    an error from `Traceback (most recent call last):` through its exception line."""

    def __init__(self) -> None:
        self._in_traceback = False

    def __call__(self, line: str) -> str:
        if line.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return "error"
        if self._in_traceback:
            if not line[:1].isspace():
                self._in_traceback = False  # the exception line ends it
            return "error"
        if _PER_PROMPT.match(line):
            return "debug"
        word = _LEVEL_WORD.search(line[:48])  # "2025-01-01 10:00:00 WARNING ...", "[ERROR]"
        if word is not None:
            return _LEVELS[word.group(1)]
        if _ERROR_WORDS.search(line):
            return "error"
        if _WARNING_WORDS.search(line):
            return "warning"
        return "info"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "vanished"
    if code < 0:
        hint = ", often the out-of-memory killer" if was_killed(code) else ""
        return f"exited with code {code} ({signal_name(code)}{hint})"
    return f"exited with code {code}"


# --- the supervisor -------------------------------------------------------------------


@dataclass
class _Run:
    """How one launched process ended."""

    code: int | None = None
    was_ready: bool = False
    ready_for_s: float = 0.0
    timed_out: bool = False


class ComfySupervisor:
    """Launches and keeps ComfyUI alive (`launch`), or watches a running one (`url`).

    `on_crash(reason)` is called when a ComfyUI that was ready dies without being asked
    to (or, external, stops answering): the job it ran is lost. `on_restart(label)` is
    called for each replacement (`crashed`, `start_timeout`, `requested`): a metric hook.
    """

    def __init__(
        self,
        launch: LaunchSpec | None = None,
        *,
        url: str | None = None,
        on_crash: Callable[[str], None] | None = None,
        on_restart: Callable[[str], None] | None = None,
        start_timeout_s: float = 300.0,
        backoff_s: Sequence[float] = RESTART_BACKOFF_S,
        stable_after_s: float = 60.0,
        stop_grace_s: float = 10.0,
        poll_interval_s: float = 0.25,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 10.0,
        unhealthy_after: int = 3,
    ) -> None:
        if (launch is None) == (url is None):
            raise ValueError("give either a LaunchSpec or the URL of a running ComfyUI")
        self._launch = launch
        self._url = (url or "").rstrip("/") or (launch.url if launch is not None else "")
        self._on_crash = on_crash
        self._on_restart = on_restart
        self._start_timeout_s = start_timeout_s
        self._backoff_s = tuple(backoff_s) or (0.0,)
        self._stable_after_s = stable_after_s
        self._stop_grace_s = stop_grace_s
        self._poll_s = poll_interval_s
        self._health_interval_s = health_interval_s
        self._health_timeout_s = health_timeout_s
        self._unhealthy_after = max(1, unhealthy_after)
        self.state = ComfyState.STARTING
        self.reason = "not started"
        self.info: dict[str, Any] = {}  # the last GET /system_stats answer
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._requested: str | None = None  # restart(reason) in progress
        self._failures = 0  # unplanned ends in a row: picks the backoff
        self._last_error: str | None = None  # ComfyUI's last error line, for the reason
        self._last_line: str | None = None
        self._restart_why = ""  # why the current replacement is being started
        self._listeners: list[Callable[[str], None]] = []

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> ComfySupervisor:
        if settings.comfyui_url:
            return cls(url=settings.comfyui_url, **kwargs)
        kwargs.setdefault("start_timeout_s", settings.comfyui_start_timeout_s)
        return cls(launch_spec_from_settings(settings), **kwargs)

    # --- what the service reads ----------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def external(self) -> bool:
        return self._launch is None

    @property
    def output_dir(self) -> Path | None:
        """ComfyUI's output folder on this machine, when we launched it (else None)."""
        return self._launch.output_dir if self._launch is not None else None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def ready(self) -> bool:
        return self.state is ComfyState.READY

    @property
    def readiness(self) -> tuple[bool, str]:
        """(can ComfyUI take a prompt now, why not), for /ready."""
        return self.ready, self.reason

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Until ready (True), failed or stopped (False), or `timeout` (False)."""

        async def settled() -> None:
            while self.state not in (ComfyState.READY, ComfyState.FAILED, ComfyState.STOPPED):
                await self._changed.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(settled(), timeout)
        return self.ready

    def listen(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """`listener(line)` hears each line a launched ComfyUI prints (cleaned, as logged)
        until the returned function is called. An external ComfyUI's lines are not seen."""
        self._listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return stop

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Launch (or start watching) in the background; returns at once. /ready tells."""
        if self._task is not None:
            return
        self._stopping = False
        launch = self._launch
        if launch is not None and launch.problem is not None:
            self._set(ComfyState.FAILED, launch.problem)
            log.error("ComfyUI cannot be started", reason=launch.problem)
            return
        self._http = httpx.AsyncClient(trust_env=False, timeout=self._health_timeout_s)
        if launch is None:
            self._set(ComfyState.STARTING, f"waiting for ComfyUI at {self._url}")
            work = self._watch_external
        else:
            work = functools.partial(self._supervise, launch)
        self._task = asyncio.create_task(self._survive(work), name="comfyui-supervisor")
        self._task.add_done_callback(self._task_ended)

    async def stop(self) -> None:
        """Stop supervising; a launched ComfyUI gets SIGTERM, then SIGKILL after the grace
        (its whole process group, so nothing it started is left behind)."""
        self._stopping = True
        self._wake.set()
        proc = self._proc
        if proc is not None:
            await self._terminate(proc)
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=self._health_timeout_s + 5)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._proc is not None and self._proc.returncode is None:  # launched meanwhile
            await self._terminate(self._proc)
        await self._drain_readers()
        self._proc = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self.state is not ComfyState.FAILED:
            self._set(ComfyState.STOPPED, "stopped")

    async def restart(self, reason: str) -> None:
        """Replace the launched ComfyUI now (after a CUDA error poisoned it). Returns once
        the old process is gone; `wait_ready()` for the new one. `on_crash` is not called."""
        if self.external:
            log.warning("cannot restart an external ComfyUI; restart it yourself", reason=reason)
            return
        if self._stopping or self.state in (ComfyState.FAILED, ComfyState.STOPPED):
            return
        log.warning("restarting ComfyUI", reason=reason, pid=self.pid)
        self._requested = reason
        self._set(ComfyState.RESTARTING, f"ComfyUI restarting: {reason}")
        self._wake.set()  # cuts a backoff short
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._terminate(proc)

    async def _survive(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` (supervising or watching); a bug in it is logged once, what it
        launched is stopped, and it starts over after a backoff instead of leaving the
        service down until a restart."""
        logged = False
        while not self._stopping:
            try:
                await work()
                return
            except Exception as exc:
                if not logged:
                    log.error("ComfyUI supervisor failed; starting over", exc_info=exc)
                    logged = True
                if self._proc is not None and self._proc.returncode is None:
                    await self._terminate(self._proc)
                await self._pause(f"ComfyUI supervisor failed ({exc!r})", self._next_delay())

    # --- launched mode -------------------------------------------------------------

    async def _supervise(self, spec: LaunchSpec) -> None:
        while not self._stopping:
            if _port_taken(spec.host, spec.port):
                why = (
                    f"ComfyUI cannot start: {spec.host}:{spec.port} is already in use (a "
                    "ComfyUI left over from an earlier run?); stop that process or set "
                    "COMFYUI_PORT"
                )
                await self._pause(why, self._next_delay())
                continue
            try:
                spec.prepare()
            except OSError as exc:
                why = f"cannot prepare ComfyUI's folders and files: {exc}"
                self._set(ComfyState.FAILED, why)
                log.error("ComfyUI cannot be started", reason=why)
                return
            try:
                proc = await self._spawn(spec)
            except OSError as exc:
                why = f"cannot start ComfyUI ({spec.argv[0]}): {exc.strerror or exc}"
                self._set(ComfyState.FAILED, why)
                log.error("ComfyUI cannot be started", reason=why, argv=list(spec.argv))
                return
            if self._stopping:
                await self._terminate(proc)
                return
            run = await self._attend(proc)
            if self._stopping:
                return
            await self._after(run)

    async def _spawn(self, spec: LaunchSpec) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env.update({"PYTHONUNBUFFERED": "1", **spec.env})
        self._requested = None
        self._last_error = self._last_line = None
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            cwd=spec.cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: stop() kills all of it
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
        self._proc = proc
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._pump(proc.stdout, "stdout", proc.pid)),
            asyncio.create_task(self._pump(proc.stderr, "stderr", proc.pid)),
        ]
        log.info("ComfyUI launched", pid=proc.pid, url=spec.url, argv=list(spec.argv))
        if self.state is ComfyState.RESTARTING:
            again = f"{self._restart_why}; started again (pid {proc.pid}), waiting for it"
            self._set(ComfyState.RESTARTING, again)
        else:
            self._set(ComfyState.STARTING, f"ComfyUI starting (pid {proc.pid}), waiting for it")
        return proc

    async def _attend(self, proc: asyncio.subprocess.Process) -> _Run:
        """Wait until it answers, then until it ends."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        exited = asyncio.ensure_future(proc.wait())
        run = _Run()
        while not exited.done() and not self._stopping:
            ok, _ = await self._check()
            if ok and proc.returncode is None and self._requested is None:
                run.was_ready = True
                break
            if loop.time() - started > self._start_timeout_s:
                run.timed_out = True
                log.error(
                    "ComfyUI did not answer in time; killing it",
                    pid=proc.pid,
                    timeout_s=self._start_timeout_s,
                )
                await self._terminate(proc)
                break
            await asyncio.wait({exited}, timeout=self._poll_s)
        if run.was_ready and not self._stopping and self._requested is None:
            ready_at = loop.time()
            version = self.info.get("system", {}).get("comfyui_version")
            self._set(ComfyState.READY, "ready")
            log.info(
                "ComfyUI ready",
                pid=proc.pid,
                url=self._url,
                comfyui_version=version,
                startup_s=round(ready_at - started, 2),
            )
            await exited
            run.ready_for_s = loop.time() - ready_at
        run.code = await exited
        _signal_group(proc.pid, signal.SIGKILL)  # whatever it started and left behind
        await self._drain_readers(timeout=2.0)  # its last words go into the reason
        return run

    async def _after(self, run: _Run) -> None:
        """Decide what the end of one process means, and wait before the next."""
        if run.ready_for_s >= self._stable_after_s:
            self._failures = 0
        if self._requested is not None:
            why, label, delay = f"ComfyUI restarting: {self._requested}", "requested", 0.0
        elif run.timed_out:
            why = (
                f"ComfyUI restarting: it did not answer GET /system_stats within "
                f"{self._start_timeout_s:g} s (COMFYUI_START_TIMEOUT_S)"
            )
            label, delay = "start_timeout", self._next_delay()
        else:
            when = "" if run.was_ready else " while starting"
            why = f"ComfyUI restarting after it {describe_exit(run.code)}{when}"
            last = self._last_error or (None if run.was_ready else self._last_line)
            if last:
                why += f"; its last output: {last[:_REASON_LINE_CHARS]}"
            label, delay = "crashed", self._next_delay()
        self.restarts += 1
        log.warning("ComfyUI ended", reason=why, exit_code=run.code, restarts=self.restarts)
        if label == "crashed" and run.was_ready:
            self._call(self._on_crash, why)
        self._call(self._on_restart, label)
        await self._pause(why, delay)

    def _next_delay(self) -> float:
        delay = self._backoff_s[min(self._failures, len(self._backoff_s) - 1)]
        self._failures += 1
        return delay

    async def _pause(self, why: str, delay: float) -> None:
        self._restart_why = why
        self._set(ComfyState.RESTARTING, f"{why}; next try in {delay:g} s" if delay else why)
        if delay:
            log.warning("ComfyUI starts again after a pause", reason=why, delay_s=delay)
        await self._sleep(delay)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._stop_grace_s)
            except TimeoutError:
                log.warning("ComfyUI ignored SIGTERM; killing it", pid=proc.pid)
        _signal_group(proc.pid, signal.SIGKILL)  # the rest of its group, if any
        await proc.wait()

    async def _pump(self, stream: asyncio.StreamReader, name: str, pid: int) -> None:
        guess = LevelGuess()
        pending = b""
        while chunk := await stream.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _MAX_LINE_BYTES:  # a line without end: log what we have
                lines.append(pending)
                pending = b""
            for raw in lines:
                self._emit(raw, guess, name, pid)
        if pending:
            self._emit(pending, guess, name, pid)

    def _emit(self, raw: bytes, guess: LevelGuess, stream: str, pid: int) -> None:
        line = clean_line(raw)
        if not line.strip():
            return
        level = guess(line)
        self._last_line = line
        if level in ("error", "critical") and not line[:1].isspace() and "Traceback" not in line:
            self._last_error = line  # the exception line of a traceback, typically
        getattr(comfy_log, level)(line, stream=stream, pid=pid)
        for listener in list(self._listeners):
            try:
                listener(line)
            except Exception:
                log.exception("ComfyUI line listener raised")

    async def _drain_readers(self, timeout: float = 2.0) -> None:
        readers, self._readers = self._readers, []
        if not readers:
            return
        _, late = await asyncio.wait(readers, timeout=timeout)
        for task in late:  # a grandchild that kept the pipe open
            task.cancel()

    # --- external mode -------------------------------------------------------------

    async def _watch_external(self) -> None:
        misses = 0
        while not self._stopping:
            ok, why = await self._check()
            if self._stopping:
                return
            if ok:
                misses = 0
                if self.state is not ComfyState.READY:
                    self._set(ComfyState.READY, "ready")
                    version = self.info.get("system", {}).get("comfyui_version")
                    log.info("ComfyUI ready", url=self._url, comfyui_version=version)
            else:
                misses += 1
                lost = (
                    f"ComfyUI at {self._url} stopped answering ({why}); waiting for it to come back"
                )
                if self.state is ComfyState.READY and misses >= self._unhealthy_after:
                    self._set(ComfyState.RESTARTING, lost)
                    log.warning("ComfyUI stopped answering", url=self._url, reason=why)
                    self._call(self._on_crash, lost)
                elif self.state is ComfyState.RESTARTING:
                    self._set(self.state, lost)
                elif self.state is not ComfyState.READY:
                    self._set(self.state, f"waiting for ComfyUI at {self._url}: {why}")
            ready = self.state is ComfyState.READY and misses == 0
            await self._sleep(self._health_interval_s if ready else self._poll_s)

    # --- helpers -------------------------------------------------------------------

    async def _check(self) -> tuple[bool, str]:
        """Does GET /system_stats answer with JSON? (and why not)"""
        if self._http is None:
            return False, "not started"
        try:
            response = await self._http.get(self._url + "/system_stats")
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.status_code != 200:
            return False, f"GET /system_stats answered {response.status_code}"
        try:
            data = response.json()
        except ValueError:
            return False, "GET /system_stats did not answer JSON (is it ComfyUI?)"
        self.info = data if isinstance(data, dict) else {}
        return True, "ok"

    def _set(self, state: ComfyState, reason: str) -> None:
        self.state, self.reason = state, reason
        self._changed.set()
        self._changed = asyncio.Event()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by restart() or stop()."""
        self._wake.clear()
        if seconds > 0 and not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)

    def _call(self, hook: Callable[[str], None] | None, value: str) -> None:
        if hook is None:
            return
        try:
            hook(value)
        except Exception:
            log.exception("ComfyUI supervisor hook raised", hook=getattr(hook, "__name__", hook))

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        why = f"ComfyUI supervisor stopped by a bug: {task.exception()!r}; restart the service"
        self._set(ComfyState.FAILED, why)
        log.error("ComfyUI supervisor crashed", exc_info=task.exception())


# --- processes ------------------------------------------------------------------------


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


_PR_SET_PDEATHSIG = 1
_libc: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: the kernel kills ComfyUI when the service dies (even
    by kill -9), so no orphan keeps the port and the GPU memory."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the service died before prctl took effect
            os._exit(1)
