"""The job record's JSON: `kind` and `plan` are typed in Python (JobKind, JobPlan) and
stored as they always were (a string, an object), so existing stores still read."""

from __future__ import annotations

import json

import pytest

from model_service.jobs.record import Job, JobKind, JobPlan
from model_service.jobs.status import JobStatus


def chain() -> Job:
    plan: JobPlan = {
        "interactive": True,
        "finalize": False,
        "colour_correction": True,
        "colour_strength": 0.5,
        "base": {"prompt": "a cat", "start_image": None},
        "start_image": "/data/jobs/c/inputs/start_image.png",
        "next_index": 2,
    }
    return Job(
        id="c",
        status=JobStatus.QUEUED,
        input={},
        prepared_input={},
        seed=1,
        request_hash="h",
        kind=JobKind.CHAIN,
        plan=plan,
        created_at=1.0,
    )


def test_kind_and_plan_are_stored_as_plain_json() -> None:
    row = json.loads(json.dumps(chain().to_row()))
    assert row["kind"] == "chain"
    assert row["plan"]["next_index"] == 2
    assert row["plan"]["base"] == {"prompt": "a cat", "start_image": None}


def test_a_stored_row_reads_back_typed() -> None:
    job = Job.from_row(json.loads(json.dumps(chain().to_row())))
    assert job.kind is JobKind.CHAIN
    assert job.is_parent
    assert job == chain()


def test_a_row_from_before_long_videos_is_a_plain_job() -> None:
    row = {k: v for k, v in chain().to_row().items() if k not in ("kind", "plan")}
    job = Job.from_row(json.loads(json.dumps(row)))
    assert job.kind is JobKind.JOB
    assert not job.is_parent
    assert job.plan == {}


def test_a_part_keeps_its_index() -> None:
    part = Job.from_row({**chain().to_row(), "kind": "job", "plan": {"index": 3}})
    assert part.plan == {"index": 3}
    assert part.plan.get("index") == 3


def test_an_unknown_kind_is_an_unreadable_row() -> None:
    # the stores leave a row that raises ValueError out of every list (test_store)
    with pytest.raises(ValueError, match="no such kind"):
        Job.from_row({**chain().to_row(), "kind": "no such kind"})
