"""The API process's handle on one worker process (spawned, like cog's worker).

Several jobs may be in flight at once (the running one and the next ones, which the
child prepares meanwhile): each is sent to the child at once and waits for its `JobDone`.
A reader thread turns the child's messages into asyncio events; when the pipe closes the
child is dead: the job that had started fails with `WorkerCrashed`, and the ones that had
not come back `JobDone(not_started=True)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
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
    JobStarted,
    RunJob,
    Shutdown,
    WorkerReady,
    WorkerSetupFailed,
)

log = get_logger("model_service.worker")

ProgressSink = Callable[[JobProgress], None]
StartedSink = Callable[[], None]


class WorkerState(StrEnum):
    STARTING = "starting"  # process spawned, model loading
    READY = "ready"  # idle, can take a job
    BUSY = "busy"  # holds jobs (running or prepared), can take more
    SETUP_FAILED = "setup_failed"  # model could not load; see `reason`
    DEAD = "dead"  # process exited; the runner replaces it


@dataclass
class _InFlight:
    """A job sent to the child, until its `JobDone`."""

    done: asyncio.Future[JobDone]
    on_progress: ProgressSink
    on_started: StartedSink
    started: bool = False  # JobStarted seen: a death now is this job's crash


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
        self._ended = asyncio.Event()  # the reader saw the process go; no job is in flight
        self._stopping = False
        self._jobs: dict[str, _InFlight] = {}  # in the order sent
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

    async def wait_ended(self) -> None:
        """Until the process is gone (and every job in it has its answer)."""
        await self._ended.wait()

    def holds(self, job_id: str) -> bool:
        """Whether `job_id` was sent to this process and has not ended."""
        return job_id in self._jobs

    async def run(self, job: RunJob, on_progress: ProgressSink, on_started: StartedSink) -> JobDone:
        """Run one job after those sent before it (which may still run): `on_started`
        when it begins. Raises WorkerCrashed if the process dies once it began; a job
        that never began (the process died or was not ready) is `not_started`."""
        if self.state not in (WorkerState.READY, WorkerState.BUSY):
            log.warning("worker not ready; job handed back", state=self.state, reason=self.reason)
            return JobDone(job.job_id, not_started=True)
        if job.job_id in self._jobs:
            raise ValueError(f"job {job.job_id} is already in this worker")
        in_flight = _InFlight(self._loop.create_future(), on_progress, on_started)
        self._jobs[job.job_id] = in_flight
        self.state = WorkerState.BUSY
        try:
            try:
                self._conn.send(job)
            except OSError as exc:  # it died before the reader thread noticed
                log.warning("the worker process is gone; job handed back", error=str(exc))
                return JobDone(job.job_id, not_started=True)
            return await asyncio.shield(in_flight.done)
        finally:
            del self._jobs[job.job_id]
            if self.state is WorkerState.BUSY and not self._jobs:
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
        with contextlib.suppress(TimeoutError):  # every job in flight has its answer
            await asyncio.wait_for(self._ended.wait(), timeout)

    def _read(self) -> None:
        while True:
            try:
                message: FromWorker | _Died = self._conn.recv()
            except (EOFError, OSError):
                self._process.join(5)
                self._deliver(_Died(self._process.exitcode))
                return
            self._deliver(message)

    def _deliver(self, message: FromWorker | _Died) -> None:
        with suppress(RuntimeError):  # the event loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._handle, message)

    def _handle(self, message: FromWorker | _Died) -> None:
        if isinstance(message, WorkerReady):
            self.state, self.reason, self.info = WorkerState.READY, "ready", message.info
            self._ready.set()
        elif isinstance(message, WorkerSetupFailed):
            self.state = WorkerState.SETUP_FAILED
            self.reason = f"setup failed: {message.message}"
            self._ready.set()
        elif isinstance(message, _Died):
            self._died(message.exitcode)
        else:
            self._job_message(message)

    def _job_message(self, message: JobStarted | JobProgress | JobDone) -> None:
        in_flight = self._jobs.get(message.job_id)
        if in_flight is None or in_flight.done.done():
            return  # it ended, or its caller is gone
        if isinstance(message, JobStarted):
            if not in_flight.started:
                in_flight.started = True
                in_flight.on_started()
        elif isinstance(message, JobProgress):
            in_flight.on_progress(message)
        else:
            in_flight.done.set_result(message)

    def _died(self, exitcode: int | None) -> None:
        why = describe_exit(exitcode)
        if self.state is not WorkerState.SETUP_FAILED:
            self.state, self.reason = WorkerState.DEAD, why
        if self._stopping:
            log.info("worker process stopped", pid=self._process.pid)
        else:
            log.warning("worker process ended", reason=why, pid=self._process.pid)
        self._ready.set()
        self._ended.set()
        for job_id, in_flight in self._jobs.items():
            if in_flight.done.done():
                continue
            if in_flight.started:
                in_flight.done.set_exception(WorkerCrashed(why, exit_code=exitcode))
            else:  # lost before it began: not its fault, it runs again
                in_flight.done.set_result(JobDone(job_id, not_started=True))
