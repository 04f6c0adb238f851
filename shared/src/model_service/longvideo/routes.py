"""`/v1/chains`, `/v1/travels`, `/v1/joins` and `/v1/redos`: long videos. Each is a job
(`GET /v1/jobs/{id}`, `/events`, `/cancel`, `/retry` work on it) whose parts are jobs
too."""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from pydantic import BaseModel

from model_service.api.body import OffLoopJsonRoute
from model_service.api.jobs import JobId, job_response
from model_service.api.state import ServiceState
from model_service.errors import WrongJobState
from model_service.jobs.record import Job, JobKind
from model_service.jobs.status import JobStatus
from model_service.jobs.view import JobView, job_view
from model_service.longvideo.bridges import BridgeSubmitter
from model_service.longvideo.requests import (
    chain_request_model,
    join_request_model,
    redo_request_model,
    segments_added_model,
    travel_request_model,
)
from model_service.longvideo.submit import LongVideoSubmitter

Prefer = Annotated[str | None, Header(description="`wait=N`: wait up to N s (max 90)")]
Submit = Callable[[dict[str, Any], str | None, str], Awaitable[tuple[Job, bool]]]


def build_router(state: ServiceState) -> APIRouter:
    spec = state.spec.long_video
    graphs = state.graphs
    assert spec is not None
    assert graphs is not None
    submitter = LongVideoSubmitter(spec, state.settings, state.submitter, graphs)
    model = state.spec.input_model
    bridges = BridgeSubmitter(spec, state.settings, model, state.submitter, submitter)
    chain_body = chain_request_model(spec, model)
    travel_body = travel_request_model(spec, model)
    added_body = segments_added_model(spec, model)
    router = APIRouter(tags=["long videos"], route_class=OffLoopJsonRoute)

    def dump(body: BaseModel) -> dict[str, Any]:
        return body.model_dump(mode="json")

    def chain_of(job_id: str) -> Job:
        job = state.store.get(job_id)
        if job.kind != JobKind.CHAIN:
            raise WrongJobState(f"job {job_id} is not a chain", job_id=job_id)
        return job

    def create_routes(noun: str, body_model: type[BaseModel], submit: Submit) -> None:
        """POST /v1/{noun}s and PUT /v1/{noun}s/{id} (your own id; repeating it is safe)."""

        @router.post(
            f"/v1/{noun}s", status_code=202, response_model=JobView, summary=f"Create a {noun}"
        )
        async def create(request: Request, body: body_model, prefer: Prefer = None) -> Response:  # type: ignore[valid-type]
            job, created = await submit(dump(body), None, state.base_url(request))
            return await job_response(state, request, job, created, prefer)

        @router.put(
            f"/v1/{noun}s/{{job_id}}",
            status_code=202,
            response_model=JobView,
            summary=f"Create a {noun} with your own id (repeating it is safe)",
        )
        async def put(
            request: Request,
            job_id: JobId,
            body: body_model,  # type: ignore[valid-type]
            prefer: Prefer = None,
        ) -> Response:
            job, created = await submit(dump(body), job_id, state.base_url(request))
            return await job_response(state, request, job, created, prefer)

    create_routes("chain", chain_body, submitter.chain)
    create_routes("travel", travel_body, submitter.travel)
    create_routes("join", join_request_model(spec), bridges.join)
    create_routes("redo", redo_request_model(spec), bridges.redo)

    @router.post(
        "/v1/chains/{job_id}/segments",
        response_model=JobView,
        summary="Interactive chain: add the next segment(s)",
    )
    async def add_segments(request: Request, job_id: JobId, body: added_body) -> JobView:  # type: ignore[valid-type]
        segments = [s.model_dump(mode="json") for s in body.segments]  # type: ignore[attr-defined]
        job = submitter.add_segments(state.store.get(job_id), segments)
        return job_view(job, state.base_url(request), state.children(job))

    @router.delete(
        "/v1/chains/{job_id}/segments/last",
        response_model=JobView,
        summary="Interactive chain: delete the last segment (to redo it)",
    )
    async def delete_last(request: Request, job_id: JobId) -> JobView:
        job = chain_of(job_id)
        if job.status is not JobStatus.AWAITING_INPUT or not job.children:
            raise WrongJobState(
                f"chain {job_id} is {job.status} with {len(job.children)} segment(s); the "
                "last segment can be deleted only while the chain awaits input",
                job_id=job_id,
            )
        job = graphs.remove_last_child(job_id)
        return job_view(job, state.base_url(request), state.children(job))

    @router.post(
        "/v1/chains/{job_id}/finalize",
        response_model=JobView,
        summary="Interactive chain: stitch the segments into the final video",
    )
    async def finalize(request: Request, job_id: JobId) -> JobView:
        job = chain_of(job_id)
        if job.status.is_terminal or not job.children:
            raise WrongJobState(
                f"chain {job_id} is {job.status} with {len(job.children)} segment(s); only an "
                "open chain with segments can be finalized",
                job_id=job_id,
            )
        job = graphs.update_plan(job_id, {**job.plan, "finalize": True})
        return job_view(job, state.base_url(request), state.children(job))

    @router.post(
        "/v1/chains/{job_id}/reopen",
        response_model=JobView,
        summary="Interactive chain: reopen a finished chain to add segments",
    )
    async def reopen(request: Request, job_id: JobId) -> JobView:
        job = chain_of(job_id)
        if job.status is not JobStatus.SUCCEEDED or not job.plan.get("interactive"):
            raise WrongJobState(
                f"chain {job_id} is {job.status}; only a finished interactive chain can be "
                "reopened",
                job_id=job_id,
            )

        def reopen_plan(record: Job) -> None:
            record.plan = {**record.plan, "finalize": False}
            record.finished_at = None

        job = state.store.transition(job_id, JobStatus.AWAITING_INPUT, reopen_plan)
        return job_view(job, state.base_url(request), state.children(job))

    return router
