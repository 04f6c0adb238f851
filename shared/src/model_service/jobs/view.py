"""The public shape of a job (API responses, server-sent events, webhooks)."""

from __future__ import annotations

import mimetypes
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus


class Progress(BaseModel):
    step: int
    total: int
    fraction: float = Field(description="0 to 1")


class Timings(BaseModel):
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_wait_s: float | None = Field(description="From submit to start of the last attempt.")
    run_s: float | None = Field(description="From start to end of the last attempt.")


def _is_none(value: object) -> bool:
    return value is None


class Output(BaseModel):
    name: str
    url: str
    content_type: str | None
    # only when the output was uploaded (S3_BUCKET or the job's `storage`)
    storage_url: str | None = Field(
        None,
        exclude_if=_is_none,
        description="The uploaded object: its URL, or a presigned GET URL (S3_PRESIGN_S).",
    )
    bucket: str | None = Field(None, exclude_if=_is_none)
    key: str | None = Field(None, exclude_if=_is_none)
    # only when asked for with `Prefer: return=representation` (model_service.api.inline)
    data: str | None = Field(
        None,
        exclude_if=_is_none,
        description="The file itself, as a base64 `data:` URI: with "
        "`Prefer: return=representation`, when the job's outputs together are small "
        "enough (INLINE_OUTPUTS_MAX_BYTES).",
    )


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code.")
    message: str = Field(description="What happened and what to do.")


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str


class PartView(BaseModel):
    """One part of a long video (a child job)."""

    id: str
    index: int = Field(description="Its place in the video, from 0.")
    status: JobStatus
    progress: float = Field(description="0 to 1")
    seed: int | None
    video: str | None = Field(description="URL of the part's own video, once it exists.")
    error: dict[str, Any] | None


class JobView(BaseModel):
    id: str
    kind: str = Field(
        "job", description="`job`; a long video: `chain` or `travel` (its parts are jobs too)."
    )
    parent_id: str | None = Field(None, exclude_if=_is_none, description="A part's long video.")
    status: JobStatus
    input: dict[str, Any]
    seed: int | None = Field(description="The seed actually used.")
    progress: Progress
    timings: Timings
    outputs: list[Output]
    outputs_expired: bool = Field(description="Outputs were deleted by the retention policy.")
    error: dict[str, Any] | None = Field(description="`{code, message, ...}` when failed.")
    info: dict[str, Any] = Field(description="Facts the model reported about the run.")
    attempts: int
    cancel_requested: bool
    links: JobLinks
    parts: list[PartView] | None = Field(
        None, exclude_if=_is_none, description="A long video's parts, in order."
    )


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def _outputs(job: Job, job_url: str) -> list[Output]:
    """Every output; once retention deleted the local files, only those in object storage,
    whose `url` is then the object's own. In a fleet, the pod that holds the files serves
    them (`held_by`)."""
    if job.held_by:
        job_url = f"{job.held_by.rstrip('/')}/v1/jobs/{job.id}"
    if not job.outputs_expired:
        return [_output(name, job_url, job.stored_outputs.get(name, {})) for name in job.outputs]
    return [
        _output(name, job_url, stored).model_copy(update={"url": stored["url"]})
        for name in job.outputs
        if (stored := job.stored_outputs.get(name, {})).get("url")
    ]


def _output(name: str, job_url: str, stored: dict[str, Any]) -> Output:
    return Output(
        name=name,
        url=f"{job_url}/outputs/{name}",
        content_type=mimetypes.guess_type(name)[0],
        storage_url=stored.get("url"),
        bucket=stored.get("bucket"),
        key=stored.get("key"),
    )


def _part(child: Job, index: int, base: str) -> PartView:
    total = child.progress_total
    done = child.status is JobStatus.SUCCEEDED
    video = next((n for n in child.outputs if n.endswith(".mp4")), None)
    return PartView(
        id=child.id,
        index=index,
        status=child.status,
        progress=1.0 if done else round(child.progress_step / total, 4) if total else 0.0,
        seed=child.seed,
        video=(
            f"{(child.held_by or base).rstrip('/')}/v1/jobs/{child.id}/outputs/{video}"
            if video and done and not child.outputs_expired
            else None
        ),
        error=child.error,
    )


def job_view(job: Job, base_url: str, children: list[Job] | None = None) -> JobView:
    """`children`: a long video's parts (listed as `parts`)."""
    base = base_url.rstrip("/")
    job_url = f"{base}/v1/jobs/{job.id}"
    total = job.progress_total
    fraction = (
        1.0 if job.status is JobStatus.SUCCEEDED else (job.progress_step / total if total else 0.0)
    )
    ended = job.finished_at
    return JobView(
        id=job.id,
        kind=str(job.kind),
        parent_id=job.parent_id,
        status=job.status,
        input=job.input,
        seed=job.seed,
        progress=Progress(step=job.progress_step, total=total, fraction=round(fraction, 4)),
        timings=Timings(
            queued_at=datetime.fromtimestamp(job.created_at, tz=UTC),
            started_at=_time(job.started_at),
            finished_at=_time(ended),
            queue_wait_s=None if job.started_at is None else job.started_at - job.created_at,
            run_s=None if job.started_at is None or ended is None else ended - job.started_at,
        ),
        outputs=_outputs(job, job_url),
        outputs_expired=job.outputs_expired,
        error=job.error,
        info=job.info,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        links=JobLinks(self=job_url, events=f"{job_url}/events", cancel=f"{job_url}/cancel"),
        parts=None
        if children is None
        else [_part(child, i, base) for i, child in enumerate(children)],
    )
