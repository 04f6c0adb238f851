"""The runner's job source in a fleet (QUEUE_URL): the model's queue on Redis (saq).

- A submitted job is stored (the shared Redis store) and enqueued by id; a job with
  dependencies (a long video's next part) is enqueued once they succeeded.
- `take` dequeues an id and claims the record (running, attempt, `held_by` = this pod);
  an id whose record is no longer runnable (canceled while queued, already finished) is
  acknowledged and skipped, so a job delivered twice never runs twice.
- While the job runs, `hold` beats the heartbeat (with progress) every third of
  QUEUE_HEARTBEAT_S and forwards a cancel made on any pod. If the queue took the job back
  meanwhile (this pod looked dead), the job is stopped here and its end is not recorded.
- The end is recorded in the store first, then acknowledged (`ended`).
- Every pod runs the sweep: jobs of pods that stopped beating are queued again, or fail
  with `poison` after JOB_MAX_ATTEMPTS starts; records queued but missing from the queue
  (a crash between storing and enqueueing, a retry, dependencies met) are enqueued.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis import RedisError

from model_service.errors import NotFound, Poison, StoreUnavailable
from model_service.fleet.files import SharedFiles
from model_service.fleet.queue import FleetQueue, Lease
from model_service.jobs.events import EventBus
from model_service.jobs.record import Job
from model_service.jobs.redis_store import unreachable
from model_service.jobs.source import Claim, RunnerLink
from model_service.jobs.status import JobStatus
from model_service.jobs.store import RunQueue
from model_service.logs import get_logger
from model_service.metrics import Metrics
from model_service.settings import Settings

log = get_logger("model_service.fleet")

_REDIS_ERRORS = (RedisError, OSError)
_ENQUEUE_AGAIN = {None, "complete", "failed", "aborted"}  # saq statuses: not in the queue


def fleet_model(service: str, settings: Settings) -> str:
    """Pods of the same service and model variant share records and a queue."""
    return service + (f":{settings.model_variant}" if settings.model_variant else "")


def own_url(settings: Settings, default_port: int) -> str:
    if settings.pod_url:
        return settings.pod_url.rstrip("/")
    port = settings.port or default_port
    if settings.runpod_pod_id:
        return f"https://{settings.runpod_pod_id}-{port}.proxy.runpod.net"
    return f"http://{socket.gethostbyname(socket.gethostname())}:{port}"


class _NotRunnable(Exception):
    pass


class FleetSource:
    recovers_on_start = False

    def __init__(
        self,
        settings: Settings,
        store: RunQueue,
        bus: EventBus,
        metrics: Metrics,
        queue: FleetQueue,
        files: SharedFiles,
        pod_url: str,
    ) -> None:
        self._settings = settings
        self._store = store
        self._bus = bus
        self._metrics = metrics
        self._queue = queue
        self._files = files
        self.pod_url = pod_url
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._link: RunnerLink | None = None

    @property
    def runner(self) -> RunnerLink:
        assert self._link is not None, "start() the source first"
        return self._link

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, link: RunnerLink) -> None:
        self._link = link
        await self._queue.connect()
        self._sweeper = self.runner.tasks.start("fleet-sweep", self._sweep_step)
        log.info("fleet pod started", queue=self._queue.name, pod=self.pod_url)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        with contextlib.suppress(*_REDIS_ERRORS):
            await self._queue.close()
        with contextlib.suppress(*_REDIS_ERRORS):
            await self._files.close()

    def wake(self) -> None:
        self._wake.set()  # the sweep's enqueue pass runs now

    # --- submitting --------------------------------------------------------------------

    async def share_inputs(self, job_id: str, inputs_dir: Path) -> None:
        try:
            await self._files.put_inputs(job_id, inputs_dir)
        except _REDIS_ERRORS as exc:
            raise unreachable(exc) from exc

    async def submitted(self, job: Job) -> None:
        if job.is_parent or job.depends_on:
            self.wake()  # parts whose dependencies are met are enqueued by the sweep pass
            return
        try:
            await self._queue.enqueue(job.id)
        except _REDIS_ERRORS as exc:  # stored: the sweep pass enqueues it
            log.warning("job stored but not enqueued yet", job_id=job.id, error=str(exc))

    async def save_upload(self, upload_id: str, path: Path) -> None:
        try:
            await self._files.save_upload(upload_id, path)
        except _REDIS_ERRORS as exc:
            raise unreachable(exc) from exc

    async def read_upload(self, upload_id: str) -> bytes | None:
        try:
            return await self._files.read_upload(upload_id)
        except _REDIS_ERRORS as exc:
            raise unreachable(exc) from exc

    # --- running -----------------------------------------------------------------------

    async def take(self, starts_now: bool = False) -> Claim | None:
        try:
            lease = await self._queue.take(timeout_s=1.0)
        except _REDIS_ERRORS as exc:  # the runner's task is down (/ready) until it can
            raise unreachable(exc) from exc
        if lease is None:
            return None
        try:
            job = self._claim(lease, starts_now)
        except StoreUnavailable as exc:  # no heartbeat: the sweep gives it to a pod later
            log.warning("cannot claim the job taken", job_id=lease.job_id, error=exc.message)
            await asyncio.sleep(1.0)
            return None
        if job is None:
            log.info("queued job is not runnable any more; dropped", job_id=lease.job_id)
            await self._acknowledge(lease)
            return None
        return Claim(job, lease)

    def _claim(self, lease: Lease, starts_now: bool) -> Job | None:
        """The record moved to running by this pod (a record still `running` is a dead
        pod's attempt that the sweep queued again); its start recorded if `starts_now`."""
        now = time.time() if starts_now else None

        def start(job: Job) -> None:
            if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) or job.is_parent:
                raise _NotRunnable
            job.status = JobStatus.RUNNING
            job.started_at = now  # else set when the engine begins it (it may wait first)
            job.attempts = lease.attempt
            job.progress_step = 0
            job.held_by = self.pod_url

        try:
            return self._store.update(lease.job_id, start, durable=False)
        except (NotFound, _NotRunnable):
            return None

    @asynccontextmanager
    async def hold(
        self, claim: Claim, progress: Callable[[], tuple[int, int]]
    ) -> AsyncIterator[None]:
        task = asyncio.create_task(self._beat(claim, progress), name="fleet-heartbeat")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _beat(self, claim: Claim, progress: Callable[[], tuple[int, int]]) -> None:
        job_id = claim.job.id
        interval = self._settings.queue_heartbeat_s / 3
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + interval
        async with self._bus.subscribe(job_id) as events:  # a cancel on another pod
            while True:
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                    async with asyncio.timeout(max(0, next_beat - loop.time())):
                        event = await events.get()
                    if event.job.cancel_requested:
                        self.runner.cancel_here(job_id)
                    continue
                except TimeoutError:
                    pass
                next_beat = loop.time() + interval
                try:
                    step, total = progress()
                    if not await self._queue.beat(claim.lease, step / total if total else None):
                        claim.lost = True
                        log.warning("the fleet took this job back; stopping it here")
                        self.runner.cancel_here(job_id)
                        return
                    record = self._store.find(job_id)  # events can be missed
                    if record is not None and record.cancel_requested:
                        self.runner.cancel_here(job_id)
                except (*_REDIS_ERRORS, StoreUnavailable) as exc:
                    log.warning("heartbeat failed; trying again", error=str(exc))

    async def local_inputs(self, job: Job) -> dict[str, Any]:
        while True:
            try:
                return await self._files.local_inputs(job)
            except _REDIS_ERRORS as exc:
                log.warning("cannot fetch the job's input files yet", error=str(exc))
                await asyncio.sleep(1.0)

    async def share_outputs(self, job: Job, output_dir: Path, names: list[str]) -> None:
        while True:  # before the part is recorded as succeeded: its end waits for this
            try:
                await self._files.put_outputs(job.id, output_dir, names)
                return
            except _REDIS_ERRORS as exc:
                log.warning("cannot share the part's outputs yet", error=str(exc))
                await asyncio.sleep(1.0)

    async def local_outputs(self, job_id: str, names: list[str]) -> list[str]:
        while True:
            try:
                return await self._files.local_outputs(job_id, names)
            except _REDIS_ERRORS as exc:
                log.warning("cannot fetch another job's outputs yet", error=str(exc))
                await asyncio.sleep(1.0)

    async def ended(self, claim: Claim) -> None:
        if not claim.lost:
            await self._acknowledge(claim.lease)
        if claim.job.parent_id:
            self.wake()  # the long video's next part may be runnable now: enqueue it

    async def _acknowledge(self, lease: Lease) -> None:
        if not await self._queue.complete_soon(lease):
            # recorded but not acknowledged: the sweep queues it again, and whoever takes
            # it finds it finished and drops it
            log.error("job end recorded but not acknowledged", job_id=lease.job_id)

    async def give_back(self, claim: Claim) -> None:
        await self._queue.give_back(claim.lease, "the pod stopped")

    def interrupted(self, claims: list[Claim]) -> list[Job]:
        return [claim.job for claim in claims if not claim.lost]

    # --- the sweep ---------------------------------------------------------------------

    async def _sweep_step(self) -> None:
        """One pass of the sweep's background task, then its pause (or a wake)."""
        interval = max(0.5, self._settings.queue_heartbeat_s / 2)
        self._wake.clear()
        try:
            await self.sweep_once(lock_s=max(1, int(interval)))
        except _REDIS_ERRORS as exc:  # the task is down (/ready, metric) until it can
            raise unreachable(exc) from exc
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), interval)

    async def sweep_once(self, lock_s: int = 1) -> None:
        result = await self._queue.sweep(lock_s)
        for job_id, attempt in result.requeued.items():
            await self._requeued(job_id, attempt)
        for job_id in result.poisoned:
            await self._poisoned(job_id)
        await self._enqueue_runnable()

    async def _requeued(self, job_id: str, attempts: int) -> None:
        self._metrics.reclaims.labels("requeued").inc()
        log.warning("job of a dead pod queued again", job_id=job_id, attempts=attempts)

        def back(job: Job) -> None:  # unless another pod has claimed it again already
            if job.status is not JobStatus.RUNNING or job.attempts != attempts:
                raise _NotRunnable
            job.status = JobStatus.QUEUED
            job.started_at = None

        with contextlib.suppress(NotFound, _NotRunnable):
            self._store.update(job_id, back)

    async def _poisoned(self, job_id: str) -> None:
        attempts = await self._queue.attempts(job_id)
        error = Poison(
            f"the pods running this job died {attempts} times (JOB_MAX_ATTEMPTS); it is not "
            "tried again. A job that kills its pod is usually out of host or GPU memory: "
            "check the pods' logs, then submit it with smaller settings",
            attempts=attempts,
        ).to_dict()

        def fail(job: Job) -> None:
            if job.status not in (JobStatus.RUNNING, JobStatus.QUEUED):
                raise _NotRunnable
            job.status = JobStatus.FAILED
            job.finished_at = time.time()
            job.error = error

        with contextlib.suppress(NotFound, _NotRunnable):
            job = self._store.update(job_id, fail)
            self._metrics.reclaims.labels("poisoned").inc()
            self._metrics.job_ended(job, was_running=False)
            log.error("job failed as poison", job_id=job_id, attempts=attempts)

    async def _enqueue_runnable(self) -> None:
        jobs = self._store.runnable()
        statuses = await self._queue.statuses([job.id for job in jobs])
        for job in jobs:
            if statuses[job.id] in _ENQUEUE_AGAIN and await self._queue.enqueue(job.id):
                log.info("queued job enqueued by the sweep", job_id=job.id)
