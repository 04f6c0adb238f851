"""The fleet queue (saq on a real redis-server): at least once, never lost."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from model_service.fleet.queue import FleetQueue
from model_service_testing.process import RedisServer

HEARTBEAT_S = 1.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def run(redis: RedisServer, scenario: Callable[[FleetQueue], Awaitable[None]]) -> None:
    async def main() -> None:
        queue = FleetQueue(redis.url, "tiny", heartbeat_s=HEARTBEAT_S, max_attempts=2)
        await queue.connect()
        try:
            await scenario(queue)
        finally:
            await queue.close()

    asyncio.run(main())


def die_holding_a_job(url: str) -> None:
    """Another worker process: takes one job, then is killed (no completion, no beat)."""
    code = textwrap.dedent(f"""
        import asyncio, os
        from model_service.fleet.queue import FleetQueue
        async def main():
            queue = FleetQueue({url!r}, "tiny", heartbeat_s={HEARTBEAT_S}, max_attempts=2)
            await queue.connect()
            lease = await queue.take(5)
            assert lease is not None
            os._exit(137)
        asyncio.run(main())
    """)
    result = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert result.returncode == 137


async def sweep_until(queue: FleetQueue, timeout_s: float = 15.0) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await queue.sweep(lock_s=1)
        if result.requeued or result.poisoned:
            return result.requeued, result.poisoned
        await asyncio.sleep(0.2)
    raise TimeoutError("nothing was swept")


def test_a_job_is_queued_once_taken_and_completed(redis: RedisServer) -> None:
    async def scenario(queue: FleetQueue) -> None:
        assert await queue.enqueue("a") is True
        assert await queue.enqueue("a") is False  # queued already: the same job
        assert await queue.depth() == 1
        assert await queue.oldest_age_s() >= 0.0
        lease = await queue.take(1)
        assert lease is not None
        assert (lease.job_id, lease.attempt) == ("a", 1)
        assert await queue.depth() == 0
        assert await queue.take(0.2) is None
        assert await queue.beat(lease, progress=0.5) is True
        await queue.complete(lease, {"outputs": ["video.mp4"]})
        assert await queue.status("a") == "complete"

    run(redis, scenario)


def test_a_dead_workers_job_is_taken_over(redis: RedisServer) -> None:
    async def scenario(queue: FleetQueue) -> None:
        await queue.enqueue("j")
        await asyncio.to_thread(die_holding_a_job, redis.url)
        requeued, poisoned = await sweep_until(queue)
        assert (requeued, poisoned) == ({"j": 1}, [])
        lease = await queue.take(5)
        assert lease is not None
        assert (lease.job_id, lease.attempt) == ("j", 2)
        await queue.complete(lease)
        assert await queue.status("j") == "complete"

    run(redis, scenario)


def test_a_job_that_keeps_killing_workers_is_poisoned(redis: RedisServer) -> None:
    async def scenario(queue: FleetQueue) -> None:
        await queue.enqueue("p")
        await asyncio.to_thread(die_holding_a_job, redis.url)
        assert await sweep_until(queue) == ({"p": 1}, [])
        await asyncio.to_thread(die_holding_a_job, redis.url)
        assert await sweep_until(queue) == ({}, ["p"])
        assert await queue.status("p") == "aborted"
        assert await queue.attempts("p") == 2
        assert await queue.take(0.2) is None

    run(redis, scenario)


def test_a_beating_worker_keeps_its_job(redis: RedisServer) -> None:
    async def scenario(queue: FleetQueue) -> None:
        await queue.enqueue("live")
        lease = await queue.take(1)
        assert lease is not None
        for _ in range(10):  # 2.5 s: past the heartbeat timeout, but beating
            await asyncio.sleep(0.25)
            assert await queue.beat(lease) is True
            result = await queue.sweep(lock_s=1)
            assert (result.requeued, result.poisoned) == ({}, [])
        await queue.complete(lease)
        assert await queue.status("live") == "complete"

    run(redis, scenario)


def test_queued_jobs_survive_a_redis_restart(redis: RedisServer) -> None:
    async def enqueue(queue: FleetQueue) -> None:
        for job_id in ("r1", "r2", "r3"):
            await queue.enqueue(job_id)

    async def take_all(queue: FleetQueue) -> None:
        assert await queue.depth() == 3
        taken = [await queue.take(1) for _ in range(3)]
        assert [lease.job_id for lease in taken if lease] == ["r1", "r2", "r3"]

    run(redis, enqueue)
    redis.restart()
    run(redis, take_all)
