"""The retry rule, in one place: a failed or canceled job may run again (same id, input
and seed; `FAILED`/`CANCELED -> QUEUED` in `status.TRANSITIONS`), and what that resets.
A long video retries its failed and canceled parts and keeps those that succeeded."""

from __future__ import annotations

from model_service.errors import WrongJobState
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus

RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELED})


def check_retryable(job: Job) -> None:
    """Raises WrongJobState (409) unless `job` may be retried."""
    if job.status not in RETRYABLE:
        raise WrongJobState(
            f"job {job.id} is {job.status}; only a failed or canceled job can be retried",
            job_id=job.id,
            status=job.status.value,
        )


def reset_for_retry(job: Job) -> None:
    """A job (or a long video's part) as it was submitted: its error, outputs, progress
    and attempts cleared; `info` keeps only the count of retries."""
    job.info = {"retries": int(job.info.get("retries", 0)) + 1}
    job.error = None
    job.outputs, job.stored_outputs, job.outputs_expired = [], {}, False
    job.cancel_requested = False
    job.attempts = 0
    job.started_at = job.finished_at = None
    job.progress_step = job.progress_total = 0


def reset_parent(job: Job) -> None:
    """A long video: its error and joined outputs cleared (its parts say the rest)."""
    job.error = None
    job.cancel_requested = False
    job.finished_at = None
    job.outputs, job.stored_outputs, job.outputs_expired = [], {}, False
