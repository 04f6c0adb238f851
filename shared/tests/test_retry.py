"""The retry rule (`jobs.retry`): which jobs may run again, and what that resets."""

from __future__ import annotations

import pytest

from model_service.errors import WrongJobState
from model_service.jobs.record import Job
from model_service.jobs.retry import RETRYABLE, check_retryable, reset_for_retry, reset_parent
from model_service.jobs.status import TRANSITIONS, JobStatus


def job(status: JobStatus) -> Job:
    return Job(
        id="j",
        status=status,
        input={},
        prepared_input={},
        seed=7,
        request_hash="h",
        started_at=1.0,
        finished_at=2.0,
        progress_step=3,
        progress_total=4,
        outputs=["o.png"],
        outputs_expired=True,
        error={"code": "boom"},
        info={"retries": 1, "run_s": 3},
        attempts=2,
        cancel_requested=True,
        stored_outputs={"o.png": {"url": "u"}},
    )


def test_only_a_failed_or_canceled_job_may_be_retried() -> None:
    assert {JobStatus.FAILED, JobStatus.CANCELED} == RETRYABLE
    for status in JobStatus:
        if status in RETRYABLE:
            check_retryable(job(status))
            assert JobStatus.QUEUED in TRANSITIONS[status]  # the state machine agrees
            continue
        with pytest.raises(WrongJobState, match="only a failed or canceled job"):
            check_retryable(job(status))


def test_a_retried_job_is_as_submitted_and_counts_its_retries() -> None:
    record = job(JobStatus.FAILED)
    reset_for_retry(record)
    assert (record.error, record.outputs, record.stored_outputs) == (None, [], {})
    assert (record.attempts, record.started_at, record.finished_at) == (0, None, None)
    assert (record.progress_step, record.progress_total) == (0, 0)
    assert not record.cancel_requested
    assert not record.outputs_expired
    assert record.info == {"retries": 2}
    assert (record.seed, record.input) == (7, {})


def test_a_retried_long_video_keeps_its_progress_and_facts() -> None:
    record = job(JobStatus.CANCELED)
    reset_parent(record)
    assert (record.error, record.outputs, record.finished_at) == (None, [], None)
    assert not record.cancel_requested
    assert record.info == {"retries": 1, "run_s": 3}
    assert record.progress_step == 3
