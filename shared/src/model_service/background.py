"""The service's background tasks (job runner, webhook sender, retention, fleet sweep,
event relay), each one step at a time, surviving its own errors.

A step that raises marks its task down: the error is logged once (with its code), the
task shows in `/ready` and in the `background_task_up` metric, and the step is tried
again after a backoff. The next step that ends well marks it up again. Only
cancellation stops a task. A task that jobs need (the runner, the fleet's sweeps) makes
`/ready` 503 while it is down; one they do not (webhooks, retention, event relays) is
named in `/ready`'s reason while it stays 200, since the pod can still run jobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from model_service.errors import ServiceError
from model_service.logs import get_logger
from model_service.metrics import Metrics

log = get_logger("model_service.background")

BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # after the 1st, 2nd, ... failure in a row

Step = Callable[[], Awaitable[None]]


def error_code(exc: BaseException) -> str:
    """The error's stable code: a ServiceError's, else the exception's class name."""
    return exc.code if isinstance(exc, ServiceError) else type(exc).__name__


def describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ServiceError) else repr(exc)


class TaskHealth:
    """Which background tasks are down, and why."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._down: dict[str, str] = {}
        self._side_tasks: set[str] = set()  # down, they do not stop jobs

    def start(self, name: str, step: Step, *, jobs_need_it: bool = True) -> asyncio.Task[None]:
        """Run `step` again and again as the task `name` until canceled."""
        if not jobs_need_it:
            self._side_tasks.add(name)
        return asyncio.create_task(self._keep_running(name, step), name=name)

    async def _keep_running(self, name: str, step: Step) -> None:
        self.up(name)
        failures = 0
        while True:
            try:
                await step()
            except Exception as exc:  # any error of one step: it goes on
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                self.down(name, exc, retry_in_s=delay)
                await asyncio.sleep(delay)
            else:
                failures = 0
                self.up(name)

    def down(self, name: str, exc: BaseException, retry_in_s: float = 0.0) -> None:
        """`name` failed: logged the first time (and when the error's code changes)."""
        code = error_code(exc)
        reason = f"{code}: {describe(exc)}"
        if not self._down.get(name, "").startswith(f"{code}: "):
            log.error(
                "background task failed; retrying",
                task=name,
                error_code=code,
                error=describe(exc),
                retry_in_s=retry_in_s,
                exc_info=None if isinstance(exc, ServiceError) else exc,  # a bug: where
            )
        self._down[name] = reason
        self._metrics.task_up.labels(name).set(0)
        self._metrics.task_failures.labels(name, code).inc()

    def up(self, name: str) -> None:
        if self._down.pop(name, None) is not None:
            log.info("background task recovered", task=name)
        self._metrics.task_up.labels(name).set(1)

    @property
    def readiness(self) -> tuple[bool, str]:
        if not self._down:
            return True, "ready"
        blocking = [name for name in self._down if name not in self._side_tasks]
        name = (blocking or list(self._down))[0]
        failing = f"background task {name} is failing ({self._down[name]}); retrying by itself"
        return (False, failing) if blocking else (True, f"ready; {failing}")
