"""`/v1/compat/worker-comfyui`: RunPod's worker-comfyui API over HTTP, for its clients.

`POST .../runsync`, `POST .../run` and `GET .../status/{id}` take and answer what RunPod's
`/v2/<endpoint>/runsync`, `/run` and `/status/{id}` do for a worker-comfyui endpoint
(`{"id", "status": "COMPLETED", "output": {"images": [...]}}`), so a client needs only its
base URL changed. Bad input is our 4xx error (`{"error": {"code", "message"}}`); a job that
fails is RunPod's `status: FAILED` with its `error` string.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from model_service.api.body import OffLoopJsonRoute
from model_service.api.jobs import MAX_WAIT_S, JobId, wait_until_terminal
from model_service.api.state import ServiceState
from model_service.compat import worker_comfyui
from model_service.errors import InvalidInput
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.jobs.view import job_view

MAX_INLINE_BYTES = 20_000_000  # RunPod's /runsync payload limit (docs.runpod.io)
RUNPOD_STATUS = {
    JobStatus.QUEUED: "IN_QUEUE",
    JobStatus.RUNNING: "IN_PROGRESS",
    JobStatus.SUCCEEDED: "COMPLETED",
    JobStatus.FAILED: "FAILED",
    JobStatus.CANCELED: "CANCELLED",
}


class RunRequest(BaseModel):
    """RunPod's request body, with worker-comfyui's input."""

    model_config = ConfigDict(extra="forbid")

    input: Annotated[
        dict[str, Any] | str,
        Field(
            description="worker-comfyui's input: {workflow: API-format graph, images?: "
            "[{name, image: base64 or data URI}]} (or the same as a JSON string)."
        ),
    ]


def build_router(state: ServiceState) -> APIRouter:
    router = APIRouter(
        prefix=worker_comfyui.ROUTE, tags=["worker-comfyui"], route_class=OffLoopJsonRoute
    )

    async def submit(request: Request, body: RunRequest) -> Job:
        raw = worker_comfyui.parsed(body.input)
        if not worker_comfyui.is_request(raw):
            raise InvalidInput(
                "input: not a worker-comfyui request: it has `workflow` (and `images`), not "
                "`files`; our own inputs go to POST /v1/jobs",
                field="input",
            )
        job, _created = await state.submitter.submit(
            worker_comfyui.to_custom_input(raw),
            job_id=None,
            webhook=None,
            webhook_events=None,
            base_url=state.base_url(request),
        )
        return job

    @router.post("/runsync", summary="Run a worker-comfyui request, waiting up to 90 s")
    async def runsync(request: Request, body: RunRequest) -> dict[str, Any]:
        job = await submit(request, body)
        return await answer(state, await wait_until_terminal(state, job, MAX_WAIT_S))

    @router.post("/run", summary="Queue a worker-comfyui request")
    async def run(request: Request, body: RunRequest) -> dict[str, Any]:
        job = await submit(request, body)
        return {"id": job.id, "status": RUNPOD_STATUS[job.status]}

    @router.get("/status/{job_id}", summary="A job, as RunPod's /status")
    async def status(job_id: JobId) -> dict[str, Any]:
        return await answer(state, state.store.get(job_id))

    # the SDK's local API takes POST /status too
    router.post("/status/{job_id}", include_in_schema=False)(status)

    return router


async def answer(state: ServiceState, job: Job) -> dict[str, Any]:
    """RunPod's `/status` body for the job, its `output` in worker-comfyui's shape."""
    body: dict[str, Any] = {"id": job.id, "status": RUNPOD_STATUS[job.status]}
    view = job_view(job, "")
    if view.timings.queue_wait_s is not None:
        body["delayTime"] = round(view.timings.queue_wait_s * 1000)
    if view.timings.run_s is not None:
        body["executionTime"] = round(view.timings.run_s * 1000)
    if not job.status.is_terminal:
        return body
    error = job.error
    if job.status is JobStatus.SUCCEEDED:
        if job.outputs_expired:
            error = {"code": "not_found", "message": "the outputs were deleted (retention)"}
        else:
            folder = state.settings.job_dir(job.id) / "outputs"
            try:
                listed = await asyncio.to_thread(
                    worker_comfyui.images, view.outputs, folder, MAX_INLINE_BYTES
                )
            except OSError:  # deleted meanwhile, or held by another pod of a fleet
                listed = None
                error = {"code": "not_found", "message": f"see GET /v1/jobs/{job.id}"}
            if listed is not None:
                return {**body, "output": worker_comfyui.answer(listed)}
            error = error or worker_comfyui.too_large(MAX_INLINE_BYTES)
    failed = worker_comfyui.failure(error or {"code": "canceled", "message": "canceled"})
    body["status"] = "FAILED" if job.status is JobStatus.SUCCEEDED else body["status"]
    body["error"] = failed.pop("error")
    if failed:
        body["output"] = failed  # `details`, as RunPod keeps them beside `error`
    return body
