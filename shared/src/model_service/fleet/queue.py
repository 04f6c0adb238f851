"""One model's job queue on Redis, shared by every pod of a fleet (QUEUE_URL).

Built on saq (its Redis queue), driven by our own runner loop rather than saq's worker:
`take` dequeues and marks the job active at once; `beat` is the heartbeat (and carries
progress); `complete` records the end and acknowledges in one Redis transaction (saq's
finish: the job record and the active list change together), so a job is never
acknowledged without its completion recorded.

At least once: a worker that dies stops beating; `sweep` (run by every pod, one at a
time under saq's sweep lock) finds its job after `heartbeat_s` and queues it again, until
the job has been started `max_attempts` times; then it is aborted, and reported as
poisoned. The job's id is the queue key, so enqueueing an id that is still queued or
running does nothing.

Why saq (0.26.4): asyncio-native; the only candidate whose dequeue/update/finish/retry
are public, so our runner keeps its own loop (engine, progress, cancel); finish writes
the result and acknowledges in one MULTI; a heartbeat-based sweep counts kills against
the attempt cap; delayed retries; per-queue counts. arq reclaims only after the longest
function timeout and is in maintenance mode; taskiq-redis and dramatiq do not count
redeliveries against a cap; rq is synchronous. Known saq pitfalls handled here: its
default 10 s job timeout (set to 0; the heartbeat reclaims), and the sweep race of a job
dequeued but not yet marked active (marked at once in `take`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from redis import RedisError
from saq import Queue
from saq.job import Job as QueueJob
from saq.job import Status
from saq.utils import now

FUNCTION = "run"  # saq names the work; our runner runs every job the same way
SWEPT = "swept"  # saq's error on a job taken back from a dead worker
# how long saq keeps a finished job's queue entry (the job's record is ours, in the store)
FINISHED_TTL_S = 24 * 3600


@dataclass
class Lease:
    """A job this worker took from the queue and must beat, complete or fail."""

    job_id: str
    attempt: int
    queued_job: QueueJob


@dataclass(frozen=True)
class SweepResult:
    requeued: dict[str, int]  # taken back from dead workers, queued again: the attempt lost
    poisoned: list[str]  # started max_attempts times without finishing


class FleetQueue:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        heartbeat_s: float = 30.0,
        max_attempts: int = 2,
        retry_delay_s: float = 0.0,
    ) -> None:
        self.name = f"model:{model}"
        self._queue = Queue.from_url(url, name=self.name)
        self._heartbeat_s = heartbeat_s
        self._max_attempts = max_attempts
        self._retry_delay_s = retry_delay_s
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    async def connect(self) -> None:
        await self._queue.connect()

    async def close(self) -> None:
        await self._queue.disconnect()

    async def enqueue(self, job_id: str) -> bool:
        """Queue `job_id`; False when it is already queued or running."""
        queued = await self._queue.enqueue(
            FUNCTION,
            key=job_id,
            timeout=0,  # no wall-clock limit here: the runner enforces JOB_TIMEOUT_S
            heartbeat=int(self._heartbeat_s) or 1,
            retries=self._max_attempts,
            retry_delay=self._retry_delay_s,
            ttl=FINISHED_TTL_S,
        )
        return queued is not None

    async def take(self, timeout_s: float = 5.0) -> Lease | None:
        job = await self._queue.dequeue(timeout=timeout_s)
        if job is None:
            return None
        # marked active at once: a queued-looking job in the active list gets swept
        job.started = now()
        job.attempts += 1
        job.worker_id = self.worker_id
        await job.update(status=Status.ACTIVE)
        return Lease(job.key, job.attempts, job)

    async def beat(self, lease: Lease, progress: float | None = None) -> bool:
        """Heartbeat; False when the job was taken back (swept) meanwhile: stop it."""
        job = lease.queued_job
        await job.refresh()
        if job.status is not Status.ACTIVE or job.worker_id != self.worker_id:
            return False
        changes: dict[str, Any] = {}
        if progress is not None:
            changes["progress"] = progress
        await job.update(**changes)  # sets `touched`: the heartbeat
        return True

    async def complete(self, lease: Lease, result: dict[str, Any] | None = None) -> None:
        await self._queue.finish(lease.queued_job, Status.COMPLETE, result=result)

    async def complete_soon(self, lease: Lease, tries: int = 5, pause_s: float = 1.0) -> bool:
        """`complete`, tried again while Redis cannot be reached; False when it never
        could (the sweep then queues the job again, and whoever takes it finds it done)."""
        for attempt in range(tries):
            try:
                await self.complete(lease)
                return True
            except (RedisError, OSError):
                if attempt + 1 < tries:
                    await asyncio.sleep(pause_s)
        return False

    async def give_back(self, lease: Lease, reason: str) -> None:
        """Queue the job again without counting this attempt (a clean stop of the pod)."""
        job = lease.queued_job
        job.attempts = max(0, job.attempts - 1)
        await self._queue.retry(job, error=reason)

    async def fail(self, lease: Lease, error: str) -> None:
        """Ends the job for good (its failure is the job's, not the worker's)."""
        await self._queue.finish(lease.queued_job, Status.FAILED, error=error)

    async def sweep(self, lock_s: int = 1) -> SweepResult:
        """Take back the jobs of dead workers (no heartbeat for `heartbeat_s`)."""
        # the attempts of the running jobs before the sweep: once queued again, another
        # worker may take a job (and count its attempt) before we read it
        running = await self._queue.info(jobs=True, limit=max(1, await self._queue.count("active")))
        # saq's to_dict leaves out fields at their default: `attempts` of a queued job
        attempts = {job["key"]: job.get("attempts", 0) for job in running["jobs"]}
        swept = await self._queue.sweep(lock=lock_s, abort=0.2)
        requeued: dict[str, int] = {}
        poisoned: list[str] = []
        for queue_id in swept:
            key = queue_id.removeprefix(self._queue.job_id(""))  # "saq:job:<queue>:"
            job = await self._queue.job(key)
            if job is not None and job.status is Status.ABORTED:
                poisoned.append(key)
            else:
                requeued[key] = attempts.get(key, 0)
        await self._queue.schedule()  # retries with a delay become due
        return SweepResult(requeued, poisoned)

    async def status(self, job_id: str) -> str | None:
        job = await self._queue.job(job_id)
        return None if job is None else str(job.status.value)

    async def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's queue status (queued, active, complete, ...; None: not in the queue)."""
        jobs = await self._queue.jobs(job_ids) if job_ids else []
        return {
            job_id: None if job is None else str(job.status.value)
            for job_id, job in zip(job_ids, jobs, strict=True)
        }

    async def attempts(self, job_id: str) -> int:
        job = await self._queue.job(job_id)
        return 0 if job is None else job.attempts

    async def depth(self) -> int:
        return await self._queue.count("queued")

    async def oldest_age_s(self) -> float:
        """How long the oldest queued job has waited (0 when none waits)."""
        info = await self._queue.info(jobs=True, limit=1000)
        queued = [job["queued"] for job in info.get("jobs", []) if job.get("status") == "queued"]
        return max(0.0, time.time() - min(queued) / 1000) if queued else 0.0
