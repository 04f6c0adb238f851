"""Background tasks: a failing step is retried; only a task jobs need makes /ready 503."""

from __future__ import annotations

import asyncio

from model_service.background import TaskHealth
from model_service.errors import StoreBusy
from model_service.metrics import Metrics


def test_a_task_jobs_need_blocks_readiness_a_side_task_only_shows_in_the_reason() -> None:
    async def failing() -> None:
        raise StoreBusy("the job store is locked")

    async def main() -> list[tuple[bool, str]]:
        health = TaskHealth(Metrics("test", lambda: 0.0))
        seen = []
        side = health.start("webhooks", failing, jobs_need_it=False)
        await asyncio.sleep(0.1)
        seen.append(health.readiness)
        needed = health.start("job-runner", failing)
        await asyncio.sleep(0.1)
        seen.append(health.readiness)
        for task in (side, needed):
            task.cancel()
        return seen

    (side_ok, side_reason), (ok, reason) = asyncio.run(main())
    assert side_ok
    assert side_reason.startswith("ready; background task webhooks is failing (store_busy")
    assert not ok
    assert reason.startswith("background task job-runner is failing (store_busy")


def test_a_failing_step_is_tried_again_until_it_works() -> None:
    async def main() -> list[str]:
        health = TaskHealth(Metrics("test", lambda: 0.0))
        seen: list[str] = []

        async def step() -> None:
            seen.append(health.readiness[1])
            if len(seen) < 3:
                raise RuntimeError("boom")
            await asyncio.sleep(3600)

        task = health.start("job-runner", step)
        while len(seen) < 3:
            await asyncio.sleep(0.05)
        task.cancel()
        return seen

    seen = asyncio.run(main())
    assert seen[0] == "ready"
    assert "job-runner is failing (RuntimeError: RuntimeError('boom'))" in seen[1]
