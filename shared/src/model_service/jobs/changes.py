"""Changes to a job's record, for `JobStore.update` and `transition` (the runner's and
the graph coordinator's)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from model_service.errors import ServiceError
from model_service.jobs.record import Job


def finish_now(job: Job) -> None:
    job.finished_at = time.time()


def mark_cancel_requested(job: Job) -> None:
    job.cancel_requested = True


def fail_with(error: ServiceError, outputs: list[str] | None = None) -> Callable[[Job], None]:
    return fail_with_dict(error.to_dict(), outputs)


def fail_with_dict(
    error: dict[str, Any], outputs: list[str] | None = None
) -> Callable[[Job], None]:
    def change(job: Job) -> None:
        job.finished_at = time.time()
        job.error = error
        if outputs:  # the upload failed: the files can still be downloaded from us
            job.outputs = outputs

    return change


def succeed_with(
    outputs: list[str], info: dict[str, Any], stored_outputs: dict[str, dict[str, Any]]
) -> Callable[[Job], None]:
    """Succeeded with `outputs` (file names), the model's `info` and the bucket objects."""

    def change(job: Job) -> None:
        job.finished_at = time.time()
        job.outputs = outputs
        job.stored_outputs = stored_outputs
        job.info = {**job.info, **info}
        job.progress_step = max(job.progress_step, job.progress_total)

    return change


def with_progress(
    change: Callable[[Job], None], progress: tuple[int, int]
) -> Callable[[Job], None]:
    """`change`, plus the last progress the engine reported (it may not be saved yet)."""

    def both(job: Job) -> None:
        job.progress_step, job.progress_total = progress
        change(job)

    return both


def give_back_attempt(job: Job) -> None:
    """Queued again uncounted: it never began."""
    job.attempts = max(0, job.attempts - 1)
    job.started_at = None
