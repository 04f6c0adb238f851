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
