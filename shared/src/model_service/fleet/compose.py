"""Long videos' compositions in a fleet: each runs once, on one pod, even if pods die.

When every part of a long video succeeded, the pod that sees it queues the parent's id on
the model's composition queue (`FleetQueue` again, named `model:<model>:compose`: the id
is the key, so a second request while one is queued or running does nothing). Every pod
takes compositions from it one at a time, beside its runner (stitching is CPU work: the
GPU goes on with the next part meanwhile), beating the heartbeat while it composes; a
pod that dies has its composition taken over by another after QUEUE_HEARTBEAT_S, and one
that keeps killing pods fails the long video with `poison` after JOB_MAX_ATTEMPTS.
Every pod's sweep also reconciles the open long videos: nothing waits for a pod that
died between a part's end and the step that part's end called for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Protocol

from redis import RedisError

from model_service.background import TaskHealth
from model_service.errors import Poison, ServiceError
from model_service.fleet.queue import FleetQueue, Lease
from model_service.jobs.redis_store import unreachable
from model_service.logs import get_logger
from model_service.metrics import Metrics

log = get_logger("model_service.fleet")

_REDIS_ERRORS = (RedisError, OSError)


class Graphs(Protocol):
    """What the compositions ask of the graph coordinator (`jobs.graph.JobGraphs`)."""

    async def compose(self, parent_id: str) -> None: ...
    async def fail_composition(self, parent_id: str, error: ServiceError) -> None: ...
    async def reconcile_open(self) -> None: ...


class FleetCompositions:
    def __init__(self, queue: FleetQueue, metrics: Metrics, heartbeat_s: float) -> None:
        self._queue = queue
        self._metrics = metrics
        self._heartbeat_s = heartbeat_s
        self._graphs: Graphs | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, graphs: Graphs) -> None:
        self._graphs = graphs

    @property
    def graphs(self) -> Graphs:
        assert self._graphs is not None, "bind() the graphs first"
        return self._graphs

    async def start(self, tasks: TaskHealth | None = None) -> None:
        """`tasks`: the service's background tasks, where a failing one is reported."""
        tasks = tasks or TaskHealth(self._metrics)
        await self._queue.connect()
        for task in (
            tasks.start("fleet-compose", self._take_next),
            tasks.start("fleet-compose-sweep", self._sweep_step),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*_REDIS_ERRORS):
            await self._queue.close()

    def request(self, parent_id: str) -> None:
        self._spawn(self._enqueue(parent_id), f"compose-request-{parent_id}")

    async def _enqueue(self, parent_id: str) -> None:
        while True:  # (the sweep's reconciliation would ask again, later)
            try:
                if await self._queue.enqueue(parent_id):
                    log.info("long video queued for composition", job_id=parent_id)
                return
            except _REDIS_ERRORS as exc:
                log.warning("cannot queue the composition yet", job_id=parent_id, error=str(exc))
                await asyncio.sleep(1.0)

    # --- composing ---------------------------------------------------------------------

    async def _take_next(self) -> None:
        """One step of the composing task: the next composition, if any, composed."""
        try:
            lease = await self._queue.take(timeout_s=1.0)
        except _REDIS_ERRORS as exc:  # the task is down (/ready) until it can
            raise unreachable(exc) from exc
        if lease is not None:
            await self.compose(lease)

    async def compose(self, lease: Lease) -> None:
        """Composes `lease`'s long video while beating its heartbeat, then acknowledges
        it. Taken back meanwhile (this pod looked dead): stopped, its new pod composes
        it. This pod stops, or the store fails under it: handed back to the queue."""
        work = asyncio.create_task(self.graphs.compose(lease.job_id), name="compose")
        try:
            while not work.done():
                await asyncio.wait([work], timeout=self._heartbeat_s / 3)
                if not work.done() and not await self._beat(lease):
                    log.warning("the fleet gave this composition to another pod; stopped")
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    return
            work.result()  # compose records the long video's own failures itself
        except asyncio.CancelledError:
            work.cancel()
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._queue.give_back(lease, "the pod stopped")
            raise
        except Exception as exc:  # the store, mostly: Redis unreachable
            log.error("composition stopped by an error; queued again", exc_info=exc)
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._queue.give_back(lease, str(exc))
            await asyncio.sleep(1.0)
            return
        if not await self._queue.complete_soon(lease):  # the sweep gives it again: a no-op
            log.error("composition recorded but not acknowledged", job_id=lease.job_id)

    async def _beat(self, lease: Lease) -> bool:
        try:
            return await self._queue.beat(lease)
        except _REDIS_ERRORS as exc:
            log.warning("composition heartbeat failed; trying again", error=str(exc))
            return True

    # --- the sweep ---------------------------------------------------------------------

    async def _sweep_step(self) -> None:
        """One pass of the composition sweep's task, after its pause."""
        interval = max(0.5, self._heartbeat_s / 2)
        await asyncio.sleep(interval)
        try:
            await self.sweep_once(lock_s=max(1, int(interval)))
        except _REDIS_ERRORS as exc:  # the task is down (/ready) until it can
            raise unreachable(exc) from exc

    async def sweep_once(self, lock_s: int = 1) -> None:
        result = await self._queue.sweep(lock_s)
        for parent_id in result.requeued:
            self._metrics.reclaims.labels("requeued").inc()
            log.warning("composition of a dead pod queued again", job_id=parent_id)
        for parent_id in result.poisoned:
            attempts = await self._queue.attempts(parent_id)
            self._metrics.reclaims.labels("poisoned").inc()
            log.error("composition failed as poison", job_id=parent_id, attempts=attempts)
            await self.graphs.fail_composition(
                parent_id,
                Poison(
                    f"the pods joining this long video's parts died {attempts} times "
                    "(JOB_MAX_ATTEMPTS); it is not tried again. Check the pods' logs (out "
                    "of memory?), then POST /v1/jobs/{id}/retry (the parts are kept)".replace(
                        "{id}", parent_id
                    ),
                    attempts=attempts,
                ),
            )
        await self.graphs.reconcile_open()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
