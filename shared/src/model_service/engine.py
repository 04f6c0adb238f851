"""What the job runner runs jobs on: an engine. Two kinds exist.

- `WorkerEngine` (here): the service's predictor in a spawned worker process (Qwen).
- `ComfyEngine` (`model_service.comfy.engine`): an embedded ComfyUI, driven over HTTP.

The runner owns the job records; an engine only turns one `RunJob` into one `JobDone`
and says whether it can take a job now (`readiness`, shown by `/ready`).

Jobs ahead: the runner hands an engine the next job while the current one runs (up to
1 + JOBS_AHEAD calls of `run` at once); the engine prepares it (inputs decoded or
uploaded, graph queued) and starts it the moment the current one ends, so the GPU never
waits for our code. The engine runs one job at a time, in the order given, and says
when each really starts (`on_started`). A crash fails only the job that had started; the
ones still waiting come back with `JobDone.not_started` and are queued again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

from model_service.errors import WorkerCrashed
from model_service.logs import get_logger
from model_service.metrics import Metrics
from model_service.predictor import WorkerConfig
from model_service.worker.process import WorkerProcess, WorkerState
from model_service.worker.protocol import JobDone, JobProgress, RunJob

log = get_logger("model_service.engine")

RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)

ProgressSink = Callable[[JobProgress], None]
StartedSink = Callable[[], None]


class Engine(Protocol):
    @property
    def readiness(self) -> tuple[bool, str]:
        """(can a job run now, why not)."""

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the loaded model or backend, for `/v1/service`."""

    async def start(self) -> None:
        """Begin loading in the background; returns at once."""

    async def stop(self, *, abandon_running: bool) -> None:
        """Shut down. `abandon_running`: a job is running and will run again after the
        restart, so do not wait for it."""

    async def wait_ready(self) -> bool:
        """Until a job can run (True), or never can until an operator acts (False)."""

    async def run(self, job: RunJob, on_progress: ProgressSink, on_started: StartedSink) -> JobDone:
        """Run one job, after the jobs handed over before it; may be called again while
        it waits or runs. `on_started` is called once, when the job itself begins.
        Raises `WorkerCrashed` (or a subclass) when the engine died under it once it
        had started; a job it lost before it started is `JobDone(not_started=True)`;
        every other failure is a `JobDone` with `error`."""

    def cancel(self, job_id: str) -> None:
        """Ask `job_id` to stop at its next step; one not started yet never starts."""

    def kill(self, job_id: str) -> None:
        """Last resort when a started job ignores its cancel: stop it by force (the
        jobs waiting behind it may come back `not_started`)."""


class WorkerEngine:
    """The predictor in one worker process, replaced (with backoff) as soon as it dies,
    busy or idle."""

    def __init__(
        self,
        predictor_path: str,
        config: WorkerConfig,
        metrics: Metrics,
        blocker: str | None = None,
    ) -> None:
        self._predictor_path = predictor_path
        self._config = config
        self._metrics = metrics
        self._blocker = blocker  # e.g. "no GPU": do not even start a worker
        self._worker: WorkerProcess | None = None
        self._new_worker = asyncio.Condition()  # notified when `_worker` is replaced
        self._keeper: asyncio.Task[None] | None = None
        self._crashes_in_a_row = 0

    @property
    def readiness(self) -> tuple[bool, str]:
        if self._blocker is not None:
            return False, self._blocker
        worker = self._worker
        if worker is None:
            return False, "starting"
        if worker.state in (WorkerState.READY, WorkerState.BUSY):
            return True, "ready"
        if worker.state is WorkerState.DEAD:
            return False, f"worker restarting: {worker.reason}"
        return False, worker.reason

    @property
    def info(self) -> dict[str, Any]:
        return {} if self._worker is None else dict(self._worker.info)

    async def start(self) -> None:
        if self._blocker is None:
            self._keeper = asyncio.create_task(self._keep_worker(), name="worker-keeper")

    async def stop(self, *, abandon_running: bool) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._worker is not None:
            if abandon_running:
                self._worker.kill()
            await self._worker.stop()

    async def wait_ready(self) -> bool:
        if self._blocker is not None:
            return False
        if self._keeper is None:  # not started yet: start now
            await self.start()
        while True:
            worker = self._worker
            if worker is not None:
                await worker.wait_started()
                if worker.state in (WorkerState.READY, WorkerState.BUSY):
                    return True
                if worker.state is WorkerState.SETUP_FAILED:
                    return False
            await self._replaced(worker)  # dead (or none yet): the keeper starts one

    async def _replaced(self, worker: WorkerProcess | None) -> None:
        async with self._new_worker:
            await self._new_worker.wait_for(lambda: self._worker is not worker)

    async def _keep_worker(self) -> None:
        """Starts the worker, and a new one whenever it dies (after the backoff of
        RESTART_BACKOFF_S, by crashes in a row), whether it held a job or not."""
        why = "starting"
        while True:
            worker = WorkerProcess(self._predictor_path, self._config, why)
            async with self._new_worker:
                self._worker = worker
                self._new_worker.notify_all()
            await worker.wait_started()
            if worker.state is WorkerState.SETUP_FAILED:
                log.error("model setup failed; jobs stay queued", reason=worker.reason)
                return
            if worker.state is WorkerState.READY:
                log.info("worker ready", worker_pid=worker.pid, info=worker.info)
            await worker.wait_ended()
            self._metrics.worker_restarts.labels("died").inc()
            delay = RESTART_BACKOFF_S[min(self._crashes_in_a_row, len(RESTART_BACKOFF_S) - 1)]
            self._crashes_in_a_row += 1
            log.warning("starting a new worker", reason=worker.reason, delay_s=delay)
            why = f"worker restarting ({worker.reason})"
            await asyncio.sleep(delay)

    async def run(self, job: RunJob, on_progress: ProgressSink, on_started: StartedSink) -> JobDone:
        worker = self._worker
        if worker is None:
            return JobDone(job.job_id, not_started=True)
        try:
            done = await worker.run(job, on_progress, on_started)
        except WorkerCrashed as exc:
            raise WorkerCrashed(
                f"{exc.message} while running this job; a new worker is starting. Retry "
                "the job; if it crashes again, use a smaller size",
                **exc.details,
            ) from exc
        if done.fatal:  # a poisoned CUDA context: the process must go
            worker.kill()
        elif not done.not_started and worker.state is not WorkerState.DEAD:
            self._crashes_in_a_row = 0
        return done

    def cancel(self, job_id: str) -> None:
        if self._worker is not None:
            self._worker.cancel(job_id)

    def kill(self, job_id: str) -> None:
        """Kill the worker process (and so every job in it) if it still holds `job_id`."""
        if self._worker is not None and self._worker.holds(job_id):
            log.warning("killing the worker process", job_id=job_id, pid=self._worker.pid)
            self._worker.kill()
