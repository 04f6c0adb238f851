"""Job events across a fleet: the in-process bus, plus Redis pub/sub between pods.

A change is delivered to this pod's listeners at once and published on the service's
channel; every other pod hands what it receives to its own listeners (server-sent
events and `Prefer: wait` on any pod). Pub/sub is fire-and-forget: a listener that
misses an event (Redis restarting) reads the record again (`api.jobs.RECHECK_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import redis
import redis.asyncio as aioredis

from model_service.background import TaskHealth
from model_service.jobs.events import EventBus
from model_service.jobs.record import Job, JobEvent
from model_service.logs import get_logger

log = get_logger("model_service.fleet.events")


class RedisEventBus(EventBus):
    def __init__(self, url: str, namespace: str) -> None:
        super().__init__()
        self._url = url
        self._channel = f"{namespace}:events"
        self._origin = uuid.uuid4().hex  # this pod: its own messages come back to it
        self._publisher = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self._task: asyncio.Task[None] | None = None
        self._tasks: TaskHealth | None = None
        self._quiet_until = 0.0  # after a failed publish: the event loop must not wait on it
        self.connected = asyncio.Event()  # subscribed (tests wait for it)

    def publish(self, event: JobEvent) -> None:
        super().publish(event)
        if time.monotonic() < self._quiet_until:
            return
        message = {"origin": self._origin, "kind": event.kind, "job": event.job.to_row()}
        try:
            self._publisher.publish(self._channel, json.dumps(message))
        except redis.RedisError as exc:
            self._quiet_until = time.monotonic() + 1.0
            log.warning("job event not sent to other pods", job_id=event.job_id, error=str(exc))

    async def start(self, tasks: TaskHealth) -> None:
        self._tasks = tasks
        self._task = tasks.start("fleet-events", self._listen, jobs_need_it=False)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._publisher.close()

    async def _listen(self) -> None:
        """One subscription, until Redis is lost (the task then subscribes again)."""
        client = aioredis.Redis.from_url(self._url, socket_connect_timeout=2)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(self._channel)
                self.connected.set()
                if self._tasks is not None:
                    self._tasks.up("fleet-events")
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._deliver(message["data"])
        finally:
            self.connected.clear()
            await client.aclose()

    def _deliver(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:  # not ours: a stray publisher on the channel
            log.warning("fleet events: message that is not JSON dropped")
            return
        if message["origin"] == self._origin:
            return
        job_id = message["job"]["id"]
        if job_id in self._subscribers:  # decoded only when someone here listens
            super().publish(JobEvent(job_id, message["kind"], Job.from_row(message["job"])))
