"""Routes of the original ComfyUI video wrappers (legacy), mapped onto the job engine.

The original services (`api_wrapper.py` on port 8189) answered `POST /generate`,
`GET /status/{id}`, `GET /download/{id}`, `GET /jobs` and `DELETE /jobs/{id}` from an
in-memory dict. Here each request is a normal job (durable, visible in /v1/jobs); only
the shapes are the original's. Differences: bad input is a 422 with the standard error
body; `DELETE /jobs/{id}` cancels a job that has not finished and deletes its files,
but the record stays (it is the audit trail); `GET /jobs` lists the newest 200 jobs.
New clients should use /v1/jobs.
"""

import asyncio
import shutil
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel

from model_service.api.state import ServiceState
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus

_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "processing",
    JobStatus.AWAITING_INPUT: "processing",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "error",
    JobStatus.CANCELED: "error",
}
_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


def legacy_status(job: Job) -> dict[str, Any]:
    """One job in the original `/status/{id}` shape."""
    total = job.progress_total or 0
    body: dict[str, Any] = {
        "job_id": job.id,
        "status": _STATUS[job.status],
        "progress": 100
        if job.status is JobStatus.SUCCEEDED
        else (round(100 * job.progress_step / total) if total else 0),
        "created_at": job.created_at,
    }
    video = _video_output(job)
    if job.status is JobStatus.SUCCEEDED and video is not None and not job.outputs_expired:
        body.update(video_ready=True, download_url=f"/download/{job.id}")
    if job.status is JobStatus.FAILED:
        body["error"] = (job.error or {}).get("message", "failed")
        body["error_code"] = (job.error or {}).get("code")
    if job.status is JobStatus.CANCELED:
        body.update(error="canceled", error_code="canceled")
    return body


def _video_output(job: Job) -> str | None:
    return next((name for name in job.outputs if name.lower().endswith(_VIDEO_SUFFIXES)), None)


def video_routers(
    request_model: type[BaseModel], to_input: Callable[[Any], dict[str, Any]]
) -> Callable[[ServiceState], list[APIRouter]]:
    """The legacy routes for a service whose legacy body is `request_model`, turned into
    the service's typed input by `to_input` (validated like any /v1/jobs input)."""

    def build(state: ServiceState) -> list[APIRouter]:
        router = APIRouter(tags=["legacy"])

        @router.post(
            "/generate", summary="Legacy: start a video (use POST /v1/jobs)", status_code=200
        )
        async def generate(request: Request, body: request_model) -> dict[str, Any]:  # type: ignore[valid-type]
            job, _ = await state.submitter.submit(
                to_input(body),
                job_id=None,
                webhook=None,
                webhook_events=None,
                base_url=state.base_url(request),
            )
            return {
                "job_id": job.id,
                "status": "queued",
                "message": "Video generation started",
                "seed": job.seed,
            }

        @router.get("/status/{job_id}", summary="Legacy: a job's status (use GET /v1/jobs/{id})")
        async def status(job_id: str) -> dict[str, Any]:
            return legacy_status(state.store.get(job_id))

        @router.get("/download/{job_id}", summary="Legacy: the finished video")
        async def download(job_id: str) -> Any:
            job = state.store.get(job_id)
            video = _video_output(job)
            if job.status is not JobStatus.SUCCEEDED or video is None or job.outputs_expired:
                return JSONResponse(
                    {
                        "error": {
                            "code": "not_completed",
                            "message": f"job {job_id} is {_STATUS[job.status]}, not completed; "
                            "poll /status/{job_id} until video_ready is true",
                        }
                    },
                    status_code=400,
                )
            path = state.settings.job_dir(job.id) / "outputs" / video
            suffix = path.suffix
            return FileResponse(path, filename=f"generated_video_{job.id}{suffix}")

        @router.get("/jobs", summary="Legacy: the newest jobs (use GET /v1/jobs)")
        async def jobs() -> dict[str, Any]:
            page = state.store.page(None, 200, None)
            return {job.id: legacy_status(job) for job in page.jobs}

        @router.delete("/jobs/{job_id}", summary="Legacy: cancel a job and delete its files")
        async def delete(job_id: str) -> dict[str, Any]:
            job = state.store.get(job_id)
            if not job.status.is_terminal:
                job = await state.runner.cancel(job_id)
            if job.status.is_terminal:
                await asyncio.to_thread(
                    shutil.rmtree, state.settings.job_dir(job_id) / "outputs", True
                )

                def mark(record: Job) -> None:
                    record.outputs_expired = True

                state.store.update(job_id, mark)
            return {"message": f"Job {job_id} deleted", "status": _STATUS[job.status]}

        return [router]

    return build
