"""The one job state machine."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"  # accepted and stored; waiting for the worker
    RUNNING = "running"  # the worker is on it
    SUCCEEDED = "succeeded"  # finished; outputs are listed on the job
    FAILED = "failed"  # finished with `error` saying why and what to do
    CANCELED = "canceled"  # stopped by a cancel request

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# Allowed moves. RUNNING -> QUEUED is the restart path: a job that was running when the
# service died is queued again (see `JobStore.recover`).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def sources_of(target: JobStatus) -> list[JobStatus]:
    """Statuses from which `target` may be entered."""
    return [source for source, targets in TRANSITIONS.items() if target in targets]
