"""The one job state machine."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"  # accepted and stored; waiting for the worker (or its dependencies)
    RUNNING = "running"  # the worker is on it (a long video: one of its parts is)
    AWAITING_INPUT = "awaiting_input"  # an interactive long video: waits for the client
    SUCCEEDED = "succeeded"  # finished; outputs are listed on the job
    FAILED = "failed"  # finished with `error` saying why and what to do
    CANCELED = "canceled"  # stopped by a cancel request

    @property
    def is_terminal(self) -> bool:
        """Finished: nothing changes it unless the client retries or reopens it."""
        return self in TERMINAL

    @property
    def is_settled(self) -> bool:
        """Nothing happens until the client acts (a `Prefer: wait` returns)."""
        return self in TERMINAL or self is JobStatus.AWAITING_INPUT


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# Allowed moves. RUNNING -> QUEUED is the restart path: a job that was running when the
# service died is queued again (see `JobRunner.recover`). FAILED/CANCELED -> QUEUED is a
# client's retry (`jobs.retry`); SUCCEEDED -> AWAITING_INPUT reopens a finished
# interactive long video.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELED,
            JobStatus.QUEUED,
            JobStatus.AWAITING_INPUT,
        }
    ),
    JobStatus.AWAITING_INPUT: frozenset(
        {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}
    ),
    JobStatus.SUCCEEDED: frozenset({JobStatus.AWAITING_INPUT}),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELED: frozenset({JobStatus.QUEUED}),
}


def sources_of(target: JobStatus) -> list[JobStatus]:
    """Statuses from which `target` may be entered."""
    return [source for source, targets in TRANSITIONS.items() if target in targets]
