"""Runs queued jobs on the service's engine, one at a time, and records every change.

The engine (a worker process, or an embedded ComfyUI) runs the job; the runner owns the
job's record: it claims the job, saves progress, enforces the timeout (cancel, then
`engine.kill()` after `cancel_grace_s`), and records how the job ended. A job whose
engine died under it fails with the engine's crash code (`worker_crashed`,
`backend_crashed`).
The engine holds the running job and up to JOBS_AHEAD more (claimed, `running` in the
store, prepared by the engine while they wait): the GPU starts the next one the moment
one ends, and a job's output handling (storage upload, recording, webhooks) runs beside
the next job. A job's run time and timeout count from when the engine began it; one
canceled while it waits never starts; one the engine lost before it began (its backend
died under the job before it) is queued again, its attempt not counted.
On start-up, jobs the store still shows as running (the service was killed) are queued
again until they have been started `job_max_attempts` times; then they fail with
`interrupted`. Jobs are idempotent by id, so running one again is safe.
Where jobs come from is the `JobSource`: the embedded store, or a fleet's queue on Redis
(then a dead pod's job is taken back by heartbeat, not on start-up). The store publishes
every write (`model_service.jobs.feed`: the event bus, the webhooks and the graph
coordinator follow it); the runner publishes progress itself, every step of a job to the
bus and to the listeners registered with `on_progress` (the graph coordinator of long
videos, which also adds its step to a part's end: `on_part_outputs`), and saves the
latest step at most once a second.
A job the engine begins at once (it held no other job) costs two writes: its claim, which
records its start, and its end (which puts the engine's own start time in its place); one
taken ahead costs three: its start is written when the engine begins it. (A long job's
progress adds a write a second.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import structlog

from model_service.background import BACKOFF_S, TaskHealth, describe, error_code
from model_service.engine import Engine
from model_service.errors import (
    InputMissing,
    Interrupted,
    InvalidTransition,
    JobTimeout,
    ServiceError,
    StorageFailed,
    StoreUnavailable,
    WorkerCrashed,
)
from model_service.job_logs import JOB_LOGS
from model_service.jobs.changes import (
    fail_with,
    fail_with_dict,
    finish_now,
    give_back_attempt,
    mark_cancel_requested,
    succeed_with,
    with_progress,
)
from model_service.jobs.events import EventBus
from model_service.jobs.record import Job, JobEvent
from model_service.jobs.retry import check_retryable, reset_for_retry
from model_service.jobs.source import Claim, JobSource, RunnerLink
from model_service.jobs.status import JobStatus
from model_service.jobs.store import JobWriter, RunQueue
from model_service.logs import get_logger
from model_service.metrics import Metrics
from model_service.settings import Settings
from model_service.storage import OutputStore, StoredObject
from model_service.worker.protocol import JobDone, JobProgress, RunJob

log = get_logger("model_service.runner")

T = TypeVar("T")
# hears every progress step the runner publishes (the job as it is now, not saved yet)
ProgressListener = Callable[[Job], None]
# a long video's part ran: (part, its input as it ran, output folder, outputs) -> more
# outputs and facts for its `info`, before its success is recorded
PartOutputs = Callable[
    [Job, dict[str, Any], Path, list[str]], Awaitable[tuple[list[str], dict[str, Any]]]
]

_PROGRESS_SAVE_S = 1.0
_WAITING_CANCEL_S = 2.0  # a cancel's reply waits this long for a job that never started


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: RunQueue,
        bus: EventBus,
        metrics: Metrics,
        source: JobSource,
    ) -> None:
        self._settings = settings
        self.engine = engine
        self._store = store
        self._bus = bus
        self._metrics = metrics
        self.source = source
        self.tasks = TaskHealth(metrics)  # this and the service's other background tasks
        self._task: asyncio.Task[None] | None = None
        # the engine holds at most the running job and JOBS_AHEAD prepared ones
        self._slots = _Slots(1 + settings.effective_jobs_ahead)
        self._claims: dict[str, Claim] = {}  # every job this process holds, by id
        self._in_engine: dict[str, _InFlight] = {}  # those the engine holds now
        self._job_tasks: set[asyncio.Task[None]] = set()
        self.mean_run_s = 10.0  # recent run time (moving average): the 429's Retry-After
        self._last_execution_end: float | None = None  # the gap metric
        # why no job can run here until an operator acts (no GPU, setup failed), once known
        self.blocked: str | None = None
        self._blocked_event = asyncio.Event()
        self._progress_listeners: list[ProgressListener] = []
        self._part_outputs: PartOutputs | None = None  # the graph coordinator's (long videos)

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self.source.recovers_on_start:
            self.recover()
        await self.source.start(RunnerLink(self.tasks, self.cancel_here))
        await self.engine.start()
        self._task = self.tasks.start("job-runner", self._take_next)

    async def stop(self) -> None:
        claims = list(self._claims.values())  # before the tasks' ends forget them
        tasks = [task for task in (self._task, *self._job_tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        interrupted = self.source.interrupted(claims)
        # a running job runs again after the restart (or on another pod): do not wait for it
        await self.engine.stop(abandon_running=bool(interrupted))
        for job in interrupted:  # a clean stop (SIGTERM) is not the job's fault
            with contextlib.suppress(ServiceError):
                self._store.transition(job.id, JobStatus.QUEUED, give_back_attempt)
            log.warning("service stopping: running job queued again", job_id=job.id)
        for claim in claims:
            if not claim.lost:
                with contextlib.suppress(Exception):  # else the fleet's sweep takes it back
                    await self.source.give_back(claim)
        await self.source.stop()

    def recover(self) -> None:
        """Requeue or fail the jobs that were running when the service last died."""
        for job in self._store.running():
            if job.started_at is None:  # taken ahead, never begun: not counted
                self._store.transition(job.id, JobStatus.QUEUED, give_back_attempt)
                log.warning("job taken ahead queued again", job_id=job.id)
            elif job.attempts >= self._settings.job_max_attempts:
                error = Interrupted(
                    f"the service stopped while this job ran, {job.attempts} times; it is "
                    "not retried again. Check the service logs (out of memory?), then "
                    "submit it again",
                    attempts=job.attempts,
                )
                job = self._store.transition(job.id, JobStatus.FAILED, fail_with(error))
                self._metrics.job_ended(job, was_running=False)
                log.warning("interrupted job failed", job_id=job.id, attempts=job.attempts)
            else:
                self._store.transition(job.id, JobStatus.QUEUED)
                log.warning("interrupted job queued again", job_id=job.id, attempts=job.attempts)

    async def wait_blocked(self) -> str:
        """Returns (the reason) once the engine is known never to become ready."""
        await self._blocked_event.wait()
        return self.blocked or "the engine cannot run jobs"

    def wake(self) -> None:
        self.source.wake()

    def on_progress(self, listener: ProgressListener) -> None:
        """`listener` hears of every progress published from now on (after the bus)."""
        self._progress_listeners.append(listener)

    def publish_progress(self, job: Job) -> None:
        """The explicit progress path (no store write): a job's step as it comes (the
        store gets the latest at most once a second), or a long video's summed progress.
        To the event bus as a `progress` event, then to the `on_progress` listeners."""
        self._bus.publish(JobEvent(job.id, "progress", job))
        for listener in self._progress_listeners:
            listener(job)

    def on_part_outputs(self, hook: PartOutputs) -> None:
        """`hook` runs after each long video's part that made outputs (the last one set)."""
        self._part_outputs = hook

    @property
    def readiness(self) -> tuple[bool, str]:
        """(can a job run now, why not)."""
        ok, reason = self.tasks.readiness
        return self.engine.readiness if ok else (ok, reason)

    @property
    def worker_info(self) -> dict[str, Any]:
        return self.engine.info

    # --- public actions --------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Idempotent. A queued job is canceled now; a running one at its next step
        (or the worker is killed after `cancel_grace_s`); a finished one is left as is."""
        job = self._store.get(job_id)
        if job.status is JobStatus.QUEUED:
            try:
                job = self._store.transition(job_id, JobStatus.CANCELED, finish_now)
            except ServiceError:  # raced with the runner starting it
                return await self.cancel(job_id)
            self._metrics.job_ended(job, was_running=False)
            return job
        if job.status is JobStatus.RUNNING and not job.cancel_requested:
            # published as a status event: a fleet's pod that runs it hears of it
            job = self._store.update(job_id, mark_cancel_requested)
            flight = self._in_engine.get(job_id)
            self.cancel_here(job_id)
            if flight is not None and not flight.started:  # taken ahead: it ends at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flight.recorded.wait(), _WAITING_CANCEL_S)
                job = self._store.get(job_id)
        return job

    def cancel_here(self, job_id: str) -> None:
        """Stop `job_id` if this process's engine holds it: at its next step (one that
        waits never starts), or by force `cancel_grace_s` after it started."""
        flight = self._in_engine.get(job_id)
        if flight is None or flight.canceling:
            return
        flight.canceling = True
        self.engine.cancel(job_id)
        if flight.started:
            self._arm_kill(job_id)

    def _arm_kill(self, job_id: str) -> None:
        asyncio.get_running_loop().call_later(
            self._settings.cancel_grace_s, self._kill_if_still_running, job_id
        )

    def retry(self, job_id: str) -> Job:
        """A failed or canceled job queued again, as it was submitted (`jobs.retry`)."""
        check_retryable(self._store.get(job_id))
        job = self._store.transition(job_id, JobStatus.QUEUED, reset_for_retry)
        self.wake()
        return job

    def _kill_if_still_running(self, job_id: str) -> None:
        flight = self._in_engine.get(job_id)
        if flight is not None and flight.started:
            log.warning("the job ignored its cancel; stopping it by force", job_id=job_id)
            self.engine.kill(job_id)

    # --- the loop ----------------------------------------------------------------------

    async def _take_next(self) -> None:
        """One step of the runner's task: hands the engine a job once it holds fewer than
        1 + JOBS_AHEAD (the next job is prepared while the current one runs). Each job
        goes on in its own task."""
        await self._slots.acquire()
        try:
            if not await self.engine.wait_ready():  # jobs stay queued; /ready says why
                self.blocked = self.engine.readiness[1]
                self._blocked_event.set()
                await asyncio.Event().wait()
            # the engine holds no other job (nor is one on its way there): the job begins
            # at once, so the claim records its start (one write fewer)
            claim = await self.source.take(starts_now=self._slots.taken == 1)
        except BaseException:
            self._slots.release()
            raise
        if claim is None:
            self._slots.release()
            return
        self._claims[claim.job.id] = claim
        task = asyncio.create_task(self._execute_claim(claim), name="job")
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        # the job goes to the engine before we look for the next: one loop turn for the
        # job's task (it starts the engine's), one for the engine's (it sends the job)
        for _ in range(2):
            await asyncio.sleep(0)

    async def _execute_claim(self, claim: Claim) -> None:
        slot = _Slot(self._slots)
        flight = _InFlight(claim.job.id, claim.job.created_at, claim.start_recorded)
        JOB_LOGS.open(claim.job.id)
        try:
            with structlog.contextvars.bound_contextvars(job_id=claim.job.id):
                try:
                    await self._execute(claim, slot, flight)
                except Exception as exc:  # never left running
                    slot.release()
                    await self._settle(claim, flight, exc)
        finally:
            slot.release()
            self._claims.pop(claim.job.id, None)
            flight.recorded.set()
            await self._keep_log(claim)

    async def _keep_log(self, claim: Claim) -> None:
        """The job's own lines, stored with it once its end is recorded (in a thread: not
        on the next job's way), then its capture ends (GET .../logs reads the capture
        until the stored copy is there)."""
        lines = JOB_LOGS.peek(claim.job.id)
        try:
            if lines and not claim.lost:
                await asyncio.to_thread(self._store.save_log, claim.job.id, lines)
        except Exception as exc:  # the job's end is recorded; only its log is lost
            log.warning("the job's log could not be stored", error=str(exc))
        finally:
            JOB_LOGS.take(claim.job.id)

    async def _execute(self, claim: Claim, slot: _Slot, flight: _InFlight) -> None:
        job = claim.job
        output_dir = self._settings.job_dir(job.id) / "outputs"
        try:
            inputs = await self._inputs_of(job)
        except InputMissing as exc:
            slot.release()
            await self._record_end(claim, None, exc, [], (0, 0), [], started=False)
            return
        run = RunJob(job.id, inputs, str(output_dir), job.seed or 0)
        recorder = self._progress_recorder(job)
        self._in_engine[job.id] = flight
        future = asyncio.ensure_future(
            self.engine.run(run, recorder, lambda: self._engine_started(flight))
        )
        done: JobDone | None = None
        failure: ServiceError | None = None
        try:
            async with self.source.hold(claim, lambda: recorder.latest):
                done = await self._until_done(future, flight)
        except TimeoutError:
            failure = JobTimeout(
                f"the job ran longer than JOB_TIMEOUT_S={self._settings.job_timeout_s:g} s "
                "and was stopped; use fewer steps or a smaller size, or raise the limit",
                timeout_s=self._settings.job_timeout_s,
            )
            self.engine.cancel(job.id)
            done = await self._await_or_kill(future, job.id)
        except WorkerCrashed as exc:
            failure = exc
        finally:
            del self._in_engine[job.id]
            slot.release()  # the engine can take the job after next now
            recorder.close()
        if failure is None and done is not None and done.not_started:
            await self._requeue_not_started(claim, flight)
            return
        if done is not None:
            self._observe_execution(job, done)
            JOB_LOGS.extend(job.id, done.log)  # the worker's lines
        outputs = [] if failure is not None else _list_outputs(output_dir, done)
        if outputs and done is not None and job.parent_id and self._part_outputs is not None:
            try:  # a part of a long video: e.g. its colour-corrected last frame
                added, info = await self._part_outputs(job, inputs, output_dir, outputs)
                outputs += added
                done.info.update(info)
                # a fleet: the other parts (and the stitch) may run on other pods
                await self.source.share_outputs(job, output_dir, outputs)
            except ServiceError as exc:
                failure, outputs = exc, []
        stored: list[StoredObject] = []
        store = OutputStore.for_job(self._settings, job.storage) if outputs else None
        if store is not None:
            # Uploaded before `succeeded` is recorded, so that a client who sees it can use
            # the URLs; the engine runs the next job meanwhile.
            try:
                stored = await store.upload(job, [output_dir / name for name in outputs])
            except StorageFailed as exc:
                failure = exc
        await self._record_end(
            claim, done, failure, outputs, recorder.latest, stored, started=flight.started
        )

    async def _until_done(self, future: asyncio.Future[JobDone], flight: _InFlight) -> JobDone:
        """The engine's result; JOB_TIMEOUT_S counts from the job's real start (a job
        handed over ahead waits for the one before it first)."""
        if not flight.started:
            waiter: asyncio.Future[Any] = asyncio.ensure_future(flight.started_event.wait())
            either: set[asyncio.Future[Any]] = {future, waiter}
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if future.done():
                return future.result()
        return await asyncio.wait_for(asyncio.shield(future), self._settings.job_timeout_s)

    def _engine_started(self, flight: _InFlight) -> None:
        """The engine began the job: its run time and timeout count from here. Its start
        is written now unless the claim wrote it (the engine was idle then)."""
        flight.started = True
        flight.started_event.set()
        now = time.time()
        log.debug("job started", job_id=flight.job_id, queued_s=round(now - flight.created_at, 3))

        def started(job: Job) -> None:
            job.started_at = now

        if flight.start_recorded:
            self._metrics.job_started(flight.created_at, now)
        else:
            try:
                self._store.update(flight.job_id, started, durable=False)
            except ServiceError as exc:  # the record keeps the claim's time
                log.warning("cannot record the job's start", error=exc.message)
            else:
                self._metrics.job_started(flight.created_at, now)
        if flight.canceling:  # canceled while it waited: it may not see the cancel
            self._arm_kill(flight.job_id)

    async def _requeue_not_started(self, claim: Claim, flight: _InFlight) -> None:
        """The engine lost the job before it began (its backend died under the job
        before it): queued again, the attempt not counted."""
        if flight.started:
            self._metrics.running.dec()
        log.warning("the engine lost this job before it started; queued again")
        await self._queue_again(claim)

    async def _queue_again(self, claim: Claim) -> None:
        """Back to the queue, its attempt not counted (unless it ended meanwhile)."""
        try:
            await self._until_stored(
                lambda: self._store.transition(claim.job.id, JobStatus.QUEUED, give_back_attempt)
            )
        except ServiceError as exc:  # canceled meanwhile: nothing to queue
            log.warning("job not queued again", error=exc.message)
            return
        if not claim.lost:
            await self.source.give_back(claim)
        self.wake()

    async def _settle(self, claim: Claim, flight: _InFlight, exc: Exception) -> None:
        """A job whose handling raised (the store, a bug) is never left running: one the
        engine had begun fails with the error's code, one it had not is queued again."""
        log.error(
            "job handling failed",
            error_code=error_code(exc),
            error=describe(exc),
            exc_info=None if isinstance(exc, ServiceError) else exc,
        )
        if claim.lost:
            return
        try:
            current = await self._until_stored(lambda: self._store.get(claim.job.id))
        except ServiceError:
            return
        if current.status is not JobStatus.RUNNING:  # its end was recorded before the error
            await self.source.ended(claim)
            return
        if not flight.started:
            await self._queue_again(claim)
            return
        failure = (
            exc
            if isinstance(exc, ServiceError)
            else ServiceError(
                f"this job's handling failed with an unexpected {type(exc).__name__}; it is "
                "logged. Retry the job, and report it if it persists"
            )
        )
        await self._record_end(claim, None, failure, [], (0, 0), [], started=True)

    async def _until_stored(self, write: Callable[[], T]) -> T:
        """`write`, tried again with backoff while the store cannot be used (Redis away,
        SQLite locked by another process, disk full)."""
        failures = 0
        while True:
            try:
                return write()
            except StoreUnavailable as exc:
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                if failures == 0:
                    log.warning("cannot write to the job store yet; retrying", error=exc.message)
                failures += 1
                await asyncio.sleep(delay)

    def _observe_execution(self, job: Job, done: JobDone) -> None:
        """The GPU's busy time, and its idle time before a job that was waiting."""
        if done.started_at is None or done.ended_at is None:
            return
        self._metrics.engine_busy.inc(max(0.0, done.ended_at - done.started_at))
        last_end = self._last_execution_end
        if last_end is not None and job.created_at <= last_end:  # it waited for the GPU
            self._metrics.job_gap.observe(max(0.0, done.started_at - last_end))
        self._last_execution_end = max(last_end or 0.0, done.ended_at)
        done.info.setdefault("execution_started_at", round(done.started_at, 4))
        done.info.setdefault("execution_ended_at", round(done.ended_at, 4))

    async def _record_end(
        self,
        claim: Claim,
        done: JobDone | None,
        failure: ServiceError | None,
        outputs: list[str],
        progress: tuple[int, int],
        stored: list[StoredObject],
        *,
        started: bool,
    ) -> None:
        """Record how the job ended, then acknowledge it to the source (never the other
        way round). A shared store that cannot be reached is tried again until it can.
        `started`: the engine began it (else it ended before it ran: canceled while it
        waited, or its input was gone)."""
        if claim.lost:
            log.warning("the fleet gave this job to another pod meanwhile; its end here is dropped")
            return
        tries = 0

        def finish() -> None:
            nonlocal tries
            tries += 1
            try:
                self._finish(claim, done, failure, outputs, progress, stored, started)
            except InvalidTransition:
                # a write whose reply was lost with the connection did land: recorded
                if tries == 1 or not self._store.get(claim.job.id).status.is_terminal:
                    raise

        await self._until_stored(finish)
        await self.source.ended(claim)
        self.wake()  # its end may make others runnable (a long video's next part)

    async def _await_or_kill(self, future: asyncio.Future[JobDone], job_id: str) -> JobDone | None:
        try:
            return await asyncio.wait_for(
                asyncio.shield(future), timeout=self._settings.cancel_grace_s
            )
        except (TimeoutError, WorkerCrashed):
            self.engine.kill(job_id)
            with contextlib.suppress(WorkerCrashed):
                await future
            return None

    def _finish(
        self,
        claim: Claim,
        done: JobDone | None,
        failure: ServiceError | None,
        outputs: list[str],
        progress: tuple[int, int],
        stored: list[StoredObject],
        started: bool,
    ) -> None:
        job_id = claim.job.id
        change: Callable[[Job], None]
        if failure is not None:
            status, change = JobStatus.FAILED, fail_with(failure, outputs)
        elif done is not None and done.error is not None:
            status, change = JobStatus.FAILED, fail_with_dict(done.error)
        else:
            assert done is not None
            status, change = (
                JobStatus.SUCCEEDED,
                succeed_with(outputs, done.info, {obj.name: asdict(obj) for obj in stored}),
            )
        began = None if done is None else done.started_at
        at_claim = claim.start_recorded

        def outcome(job: Job) -> JobStatus:
            """Canceled when a cancel reached the job (the store says if one came)."""
            canceled = job.cancel_requested or (done is not None and done.canceled)
            return JobStatus.CANCELED if failure is None and canceled else status

        def ended(job: Job) -> None:
            if began is not None and (job.started_at is None or at_claim):
                job.started_at = began  # the engine's own time (not heard, or the claim's)
            elif at_claim and not started:
                job.started_at = None  # it never began (its input was gone, or canceled)
            canceled = job.status is JobStatus.CANCELED
            with_progress(finish_now if canceled else change, progress)(job)

        # one read and one write, not fsynced: after a power loss the job runs again (see
        # SqliteJobStore._tx)
        job = self._store.transition(job_id, outcome, ended, durable=False)
        self._metrics.job_ended(job, was_running=started)
        if job.status is JobStatus.SUCCEEDED and job.started_at and job.finished_at:
            self.mean_run_s = 0.8 * self.mean_run_s + 0.2 * (job.finished_at - job.started_at)
        # a job that failed says so at info; a success is per-job detail (debug)
        (log.debug if job.status is JobStatus.SUCCEEDED else log.info)(
            "job finished",
            status=job.status.value,
            error_code=(job.error or {}).get("code"),
            run_s=job.started_at and job.finished_at and round(job.finished_at - job.started_at, 3),
        )

    async def _inputs_of(self, job: Job) -> dict[str, Any]:
        """The job's input, with the files it takes from other jobs' outputs filled in."""
        inputs = await self.source.local_inputs(job)
        for field_name, source in job.inputs_from.items():
            source_id, _, name = source.partition("/")
            if await self.source.local_outputs(source_id, [name]):
                raise InputMissing(
                    f"input.{field_name}: output {name!r} of job {source_id} is gone "
                    "(deleted by retention); submit the long video again",
                    field=f"input.{field_name}",
                    source_job=source_id,
                )
            path = self._settings.job_dir(source_id) / "outputs" / name
            inputs[field_name] = str(path.resolve())
        return inputs

    def _progress_recorder(self, job: Job) -> _ProgressRecorder:
        return _ProgressRecorder(job, self._store, self.publish_progress)


@dataclass
class _InFlight:
    """A job the engine holds: waiting behind the running one, or running."""

    job_id: str
    created_at: float  # the job's (the queue wait metric)
    start_recorded: bool  # its claim recorded its start (the engine held no other job)
    started: bool = False
    canceling: bool = False
    started_event: asyncio.Event = field(default_factory=asyncio.Event)
    recorded: asyncio.Event = field(default_factory=asyncio.Event)  # its end is recorded


class _Slots:
    """The engine's places: the running job and JOBS_AHEAD more. A job holds one from
    before its claim until the engine gave it back (or it never reached the engine)."""

    def __init__(self, count: int) -> None:
        self._free = asyncio.Semaphore(count)
        self.taken = 0

    async def acquire(self) -> None:
        await self._free.acquire()
        self.taken += 1

    def release(self) -> None:
        self.taken -= 1
        self._free.release()


class _Slot:
    """One of the engine's places (`JobRunner._slots`), given back exactly once."""

    def __init__(self, slots: _Slots) -> None:
        self._slots: _Slots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


class _ProgressRecorder:
    """Every step goes to listeners at once; the store gets the latest step at most
    `_PROGRESS_SAVE_S` after it came (a write per step would cost the event loop a
    transaction per step, and a job that ends sooner needs none: its end records it)."""

    def __init__(self, job: Job, store: JobWriter, publish: Callable[[Job], None]) -> None:
        self._job = job
        self._store = store
        self._publish = publish
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self, message: JobProgress) -> None:
        self._job = replace(self._job, progress_step=message.step, progress_total=message.total)
        self._publish(self._job)
        if self._pending is None:
            loop = asyncio.get_running_loop()
            self._pending = loop.call_later(_PROGRESS_SAVE_S, self._save)

    def _save(self) -> None:
        self._pending = None
        step, total = self._job.progress_step, self._job.progress_total

        def change(record: Job) -> None:
            record.progress_step, record.progress_total = step, total

        with contextlib.suppress(ServiceError):  # the job is gone: nothing to save
            self._store.update(self._job.id, change, durable=False)

    @property
    def latest(self) -> tuple[int, int]:
        return self._job.progress_step, self._job.progress_total

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def _list_outputs(output_dir: Path, done: JobDone | None) -> list[str]:
    if done is None or done.error is not None or done.canceled:
        return []
    return [name for name in done.outputs if (output_dir / name).is_file()]
