"""Long videos' compositions in a fleet (a real redis-server): each runs once, and the
composition of a pod that dies is taken over by another pod, or fails as poison."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from model_service.errors import ServiceError
from model_service.fleet.compose import FleetCompositions
from model_service.fleet.queue import FleetQueue
from model_service.metrics import Metrics
from model_service_testing.process import RedisServer

HEARTBEAT_S = 1.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


class Graphs:
    """Stands for `JobGraphs`: records what the compositions queue asked of it."""

    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang  # compose never ends (the pod dies while composing)
        self.started: list[str] = []
        self.composed: list[str] = []
        self.failed: dict[str, ServiceError] = {}
        self.reconciled = 0

    async def compose(self, parent_id: str) -> None:
        self.started.append(parent_id)
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(0.05)
        self.composed.append(parent_id)

    async def fail_composition(self, parent_id: str, error: ServiceError) -> None:
        self.failed[parent_id] = error

    async def reconcile_open(self) -> None:
        self.reconciled += 1


def pod(redis: RedisServer, graphs: Graphs, max_attempts: int = 2) -> FleetCompositions:
    queue = FleetQueue(
        redis.url, "tiny:compose", heartbeat_s=HEARTBEAT_S, max_attempts=max_attempts
    )
    compositions = FleetCompositions(queue, Metrics("tiny", lambda: 0.0), HEARTBEAT_S)
    compositions.bind(graphs)  # type: ignore[arg-type]
    return compositions


async def until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def composing(graphs: Graphs, parent_id: str) -> None:
    await until(lambda: graphs.started == [parent_id], timeout_s=20)


def reclaims(compositions: FleetCompositions, outcome: str) -> float:
    value = compositions._metrics.registry.get_sample_value(
        "model_service_fleet_reclaims_total", {"outcome": outcome}
    )
    return value or 0.0


def test_requests_from_every_pod_compose_once(redis: RedisServer) -> None:
    async def main() -> None:
        graphs = [Graphs(), Graphs(), Graphs()]
        pods = [pod(redis, g) for g in graphs]
        for compositions in pods:
            await compositions.start()
        try:
            for _ in range(3):  # every pod saw the last part end, some twice
                for compositions in pods:
                    compositions.request("lv1")
            await until(lambda: sum(len(g.composed) for g in graphs) >= 1)
            await asyncio.sleep(3 * HEARTBEAT_S)  # room for a second (wrong) composition
            assert sum(len(g.started) for g in graphs) == 1
            assert sum(g.reconciled for g in graphs) > 0  # the sweeps reconcile
        finally:
            for compositions in pods:
                await compositions.stop()

    asyncio.run(main())


def die_composing(redis: RedisServer, parent_id: str, max_attempts: int = 2) -> None:
    """Another pod (a process): takes the composition, then is killed while composing."""
    code = textwrap.dedent(f"""
        import asyncio, os
        from model_service.fleet.compose import FleetCompositions
        from model_service.fleet.queue import FleetQueue
        from model_service.metrics import Metrics

        class Graphs:
            async def compose(self, parent_id):
                os._exit(137)

            async def reconcile_open(self):
                pass

        async def main():
            queue = FleetQueue(
                {redis.url!r}, "tiny:compose", heartbeat_s={HEARTBEAT_S},
                max_attempts={max_attempts},
            )
            compositions = FleetCompositions(queue, Metrics("tiny", lambda: 0.0), {HEARTBEAT_S})
            compositions.bind(Graphs())
            await compositions.start()
            compositions.request({parent_id!r})
            await asyncio.sleep(30)

        asyncio.run(main())
    """)
    result = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert result.returncode == 137


def test_a_dead_pods_composition_is_taken_over(redis: RedisServer) -> None:
    die_composing(redis, "lv2")

    async def main() -> None:
        survivor = Graphs()
        second = pod(redis, survivor)
        await second.start()
        try:
            await until(lambda: survivor.composed == ["lv2"])
            assert reclaims(second, "requeued") == 1
            assert survivor.failed == {}
        finally:
            await second.stop()

    asyncio.run(main())


def test_a_stopping_pod_hands_its_composition_back(redis: RedisServer) -> None:
    async def main() -> None:
        stopping, survivor = Graphs(hang=True), Graphs()
        first, second = pod(redis, stopping), pod(redis, survivor)
        await first.start()
        first.request("lv4")
        await composing(stopping, "lv4")
        await first.stop()  # SIGTERM: handed back at once, the attempt not counted
        await second.start()
        try:
            await until(lambda: survivor.composed == ["lv4"], timeout_s=5)
            assert reclaims(second, "requeued") == 0
            assert await second._queue.attempts("lv4") == 1
        finally:
            await second.stop()

    asyncio.run(main())


def test_a_composition_that_keeps_killing_pods_fails_as_poison(redis: RedisServer) -> None:
    for _ in range(2):  # JOB_MAX_ATTEMPTS pods die composing it
        die_composing(redis, "lv3")

    async def main() -> None:
        judge = Graphs()
        last = pod(redis, judge)
        await last.start()
        try:
            await until(lambda: "lv3" in judge.failed)
            error = judge.failed["lv3"]
            assert error.code == "poison"
            assert "retry" in error.message
            assert judge.started == []
            assert reclaims(last, "poisoned") == 1
        finally:
            await last.stop()

    asyncio.run(main())
