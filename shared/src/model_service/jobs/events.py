"""In-process publish/subscribe of job changes (feeds server-sent events and waits).

What it carries: `status` events, from the store's change feed (`follow`: a status
moved, a new attempt, a cancel requested), and `progress` events, published by the
runner (every step of a job) and the graph coordinator (a long video's sum) through
`JobRunner.publish_progress`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from model_service.jobs.feed import ChangeFeed, ChangeKind, JobChange
from model_service.jobs.record import JobEvent

if TYPE_CHECKING:
    from model_service.background import TaskHealth


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = defaultdict(set)

    async def start(self, tasks: TaskHealth) -> None:
        """Nothing to start in one process (a fleet's bus subscribes to Redis, as one of
        `tasks`)."""

    async def stop(self) -> None:
        pass

    def follow(self, changes: ChangeFeed) -> None:
        """Publish the store's status changes and cancel requests as `status` events (a
        fleet: to the other pods too, so the pod that runs a job hears of its cancel)."""
        changes.subscribe(self._changed, ChangeKind.STATUS, ChangeKind.CANCEL)

    def _changed(self, change: JobChange) -> None:
        self.publish(JobEvent(change.job.id, "status", change.job))

    def publish(self, event: JobEvent) -> None:
        for queue in self._subscribers.get(event.job_id, ()):
            queue.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[asyncio.Queue[JobEvent]]:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[job_id].discard(queue)
            if not self._subscribers[job_id]:
                del self._subscribers[job_id]
