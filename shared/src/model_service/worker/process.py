"""The API process's handle on one worker process (spawned, like cog's worker).

A reader thread turns the child's messages into asyncio events; when the pipe closes
the child is dead, and whatever job it held fails with `WorkerCrashed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections.abc import Callable
from contextlib import suppress
from enum import StrEnum
from typing import Any

from model_service.errors import WorkerCrashed
from model_service.exits import signal_name, was_killed
from model_service.logs import get_logger
from model_service.predictor import WorkerConfig
from model_service.worker.child import worker_main
from model_service.worker.protocol import (
    CancelJob,
    FromWorker,
    JobDone,
    JobProgress,
    RunJob,
    Shutdown,
    WorkerReady,
    WorkerSetupFailed,
)

log = get_logger("model_service.worker")


class WorkerState(StrEnum):
    STARTING = "starting"  # process spawned, model loading
    READY = "ready"  # idle, can take a job
    BUSY = "busy"  # running a job
    SETUP_FAILED = "setup_failed"  # model could not load; see `reason`
    DEAD = "dead"  # process exited; the runner replaces it


class _Died:
    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker process vanished"
    if exitcode < 0:
        hint = " (killed: often out of host memory)" if was_killed(exitcode) else ""
        return f"the worker process died from signal {-exitcode} ({signal_name(exitcode)}){hint}"
    return f"the worker process exited with code {exitcode}"


class WorkerProcess:
    def __init__(self, predictor_path: str, config: WorkerConfig, reason: str = "starting") -> None:
        self._predictor_path = predictor_path
        self._config = config
        self.state = WorkerState.STARTING
        self.reason = f"{reason}: loading the model"
        self.info: dict[str, Any] = {}
        self._ready = asyncio.Event()
        self._stopping = False
        self._job_id: str | None = None
        self._done: asyncio.Future[JobDone] | None = None
        self._on_progress: Callable[[JobProgress], None] | None = None
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=worker_main,
            args=(child_conn, predictor_path, config),
            name="model-worker",
            daemon=True,
        )
        self._loop = asyncio.get_running_loop()
        self._process.start()
        child_conn.close()
        threading.Thread(target=self._read, name="worker-reader", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def wait_started(self) -> None:
        """Until the model is loaded, setup failed, or the process died."""
        await self._ready.wait()

    async def run(self, job: RunJob, on_progress: Callable[[JobProgress], None]) -> JobDone:
        """Run one job; raises WorkerCrashed if the process dies meanwhile."""
        if self.state is not WorkerState.READY:
            raise WorkerCrashed(f"worker not ready ({self.state}): {self.reason}")
        self.state = WorkerState.BUSY
        self._job_id = job.job_id
        self._on_progress = on_progress
        self._done = self._loop.create_future()
        try:
            try:
                self._conn.send(job)
            except OSError as exc:  # it died before the reader thread noticed
                raise WorkerCrashed(f"the worker process is gone ({exc})") from exc
            return await asyncio.shield(self._done)
        finally:
            self._job_id = None
            self._done = None
            if self.state is WorkerState.BUSY:
                self.state = WorkerState.READY

    def cancel(self, job_id: str) -> None:
        if self.state in (WorkerState.READY, WorkerState.BUSY):
            with suppress(OSError):  # a dead worker is reported by the reader thread
                self._conn.send(CancelJob(job_id))

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            # dead from now on: no job may be sent to it before the reader sees it go
            if self.state in (WorkerState.READY, WorkerState.BUSY):
                self.state, self.reason = WorkerState.DEAD, "killed"

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(Shutdown())
            await asyncio.to_thread(self._process.join, timeout)
        self.kill()
        await asyncio.to_thread(self._process.join, timeout)

    def _read(self) -> None:
        while True:
            try:
                message: FromWorker | _Died = self._conn.recv()
            except (EOFError, OSError):
                self._process.join(5)
                self._loop.call_soon_threadsafe(self._handle, _Died(self._process.exitcode))
                return
            self._loop.call_soon_threadsafe(self._handle, message)

    def _handle(self, message: FromWorker | _Died) -> None:
        if isinstance(message, WorkerReady):
            self.state, self.reason, self.info = WorkerState.READY, "ready", message.info
            self._ready.set()
        elif isinstance(message, WorkerSetupFailed):
            self.state = WorkerState.SETUP_FAILED
            self.reason = f"setup failed: {message.message}"
            self._ready.set()
        elif isinstance(message, JobProgress):
            if self._on_progress is not None and message.job_id == self._job_id:
                self._on_progress(message)
        elif isinstance(message, JobDone):
            if self._done is not None and not self._done.done():
                self._done.set_result(message)
        elif isinstance(message, _Died):
            why = describe_exit(message.exitcode)
            if self.state is not WorkerState.SETUP_FAILED:
                self.state, self.reason = WorkerState.DEAD, why
            if self._stopping:
                log.info("worker process stopped", pid=self._process.pid)
            else:
                log.warning("worker process ended", reason=why, pid=self._process.pid)
            self._ready.set()
            if self._done is not None and not self._done.done():
                self._done.set_exception(WorkerCrashed(why, exit_code=message.exitcode))
