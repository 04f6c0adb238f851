"""`/v1/jobs`: create, idempotent put, get, list, cancel, events, output download."""

import asyncio
import re
import time
from collections.abc import AsyncIterator
from stat import S_ISREG
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, SkipValidation, create_model

from model_service.api.body import OffLoopJsonRoute
from model_service.api.inline import prefers_inline, with_inline_outputs
from model_service.api.state import ServiceState
from model_service.errors import NotFound
from model_service.job_logs import JOB_LOGS
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.jobs.view import JobView, job_view
from model_service.storage import StorageRequest
from model_service.webhooks import WEBHOOK_EVENTS

SMALL_OUTPUT_BYTES = 4 << 20  # outputs up to this size are sent from memory
MAX_WAIT_S = 90  # RunPod's proxy cuts requests at 100 s
# events can be missed (a fleet's Redis pub/sub is fire-and-forget): waits and streams
# read the record again at least this often
RECHECK_S = 5.0
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job's id.")]


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page.")


class JobLog(BaseModel):
    """What was logged about the job while it ran (model_service.job_logs)."""

    job_id: str
    status: JobStatus
    complete: bool = Field(
        description="The job ended: these are all its lines. False "
        "while it runs (the lines so far, when it runs on this pod; in a fleet, none until "
        "it ends)."
    )
    lines: list[str] = Field(
        description="`<UTC time> <level or source> <logger>: <event> key=value ...`, in "
        "time order: the service's lines about the job, its worker's and, for a launched "
        "ComfyUI, ComfyUI's own lines while its prompt ran; at most JOB_LOG_LINES (the "
        "first tenth and the most recent rest)."
    )


def job_request_model(
    input_model: type[BaseModel], custom_model: type[BaseModel] | None = None
) -> type[BaseModel]:
    """The request body, typed with this service's input (shown in /docs). With custom
    workflows on (`custom_model`), `input` may be a workflow too: both are shown, and the
    submitter checks which it is (so that a typed input's errors name its own fields)."""
    input_type: Any = input_model
    description = "The service's typed input."
    if custom_model is not None:
        either: Any = input_model | custom_model
        input_type = Annotated[either, SkipValidation()]  # type: ignore[type-arg]
        description += " Or your own ComfyUI workflow: {workflow, files} (README)."
    model: type[BaseModel] = create_model(
        "JobRequest",
        input=(input_type, Field(description=description)),
        webhook=(
            str | None,
            Field(None, max_length=2048, description="https URL called on job events."),
        ),
        webhook_events=(
            list[str] | None,
            Field(
                None,
                description=f"Events that call the webhook: any of {list(WEBHOOK_EVENTS)}; "
                "default: the terminal ones.",
            ),
        ),
        storage=(
            StorageRequest | None,
            Field(
                None,
                description="Upload the outputs to this bucket/prefix (S3-compatible, the "
                "service's endpoint and credentials) instead of S3_BUCKET / S3_PREFIX.",
            ),
        ),
    )
    return model


def prefer_wait(prefer: str | None) -> int:
    match = _PREFER_WAIT.search(prefer or "")
    return min(int(match.group(1)), MAX_WAIT_S) if match else 0


async def wait_until_terminal(state: ServiceState, job: Job, seconds: float) -> Job:
    """The job once it finished (or waits for the client), or as it is when `seconds`
    ran out."""
    deadline = time.monotonic() + seconds
    async with state.bus.subscribe(job.id) as events:
        job = state.store.get(job.id)
        while not job.status.is_settled:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(min(remaining, RECHECK_S)):
                    job = (await events.get()).job
            except TimeoutError:
                job = state.store.get(job.id)
    return job


async def job_response(
    state: ServiceState, request: Request, job: Job, created: bool, prefer: str | None
) -> Response:
    """A created (or repeated) job as the answer: 202, or 200 once settled within
    `Prefer: wait`, or for a repeat; `location` names the job."""
    wait = prefer_wait(prefer)
    headers = {"location": f"/v1/jobs/{job.id}"}
    applied = []
    if wait:
        job = await wait_until_terminal(state, job, wait)
        applied.append(f"wait={wait}")
    status_code = 200 if job.status.is_settled or not created else 202
    view, inlined = await view_of(state, request, job, prefer)
    if inlined:
        applied.append("return=representation")
    if applied:
        headers["preference-applied"] = ", ".join(applied)
    return view_response(view, status_code, headers)


def view_response(view: JobView, status_code: int, headers: dict[str, str] | None) -> Response:
    """The view as JSON, serialised by pydantic in one step (no dict, then `json`)."""
    return Response(view.model_dump_json(), status_code, headers, media_type="application/json")


async def view_of(
    state: ServiceState, request: Request, job: Job, prefer: str | None
) -> tuple[JobView, bool]:
    """The job's view, with its outputs inline if `Prefer: return=representation` asks
    and they can be (small, here); and whether they are."""
    view = job_view(job, state.base_url(request), state.children(job))
    if prefers_inline(prefer):
        inline = await with_inline_outputs(view, job, state.settings, state.pod_url)
        if inline is not None:
            return inline, True
    return view, False


def build_router(state: ServiceState) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=OffLoopJsonRoute)
    request_model = job_request_model(state.spec.input_model, state.submitter.custom_model)

    async def submit(request: Request, body: BaseModel, job_id: str | None) -> tuple[Job, bool]:
        payload: Any = body.model_dump(mode="json", exclude={"input"})
        raw = getattr(body, "input")  # noqa: B009 - a field of the generated model
        return await state.submitter.submit(
            raw.model_dump(mode="json") if isinstance(raw, BaseModel) else raw,
            job_id=job_id,
            webhook=payload.get("webhook"),
            webhook_events=payload.get("webhook_events"),
            storage=payload.get("storage"),
            base_url=state.base_url(request),
        )

    def existing_job(job_id: JobId) -> str:
        state.store.get(job_id)  # raises NotFound (404) before a stream starts
        return job_id

    @router.post(
        "",
        status_code=202,
        response_model=JobView,
        summary="Create a job",
        responses={200: {"model": JobView, "description": "Finished within `Prefer: wait`"}},
    )
    async def create_job(
        request: Request,
        body: request_model,  # type: ignore[valid-type]
        prefer: Annotated[
            str | None,
            Header(
                description="`wait=N`: wait up to N s (max 90); `return=representation`: "
                "small outputs inline (`data`)"
            ),
        ] = None,
    ) -> Response:
        job, created = await submit(request, body, None)
        return await job_response(state, request, job, created, prefer)

    @router.put(
        "/{job_id}",
        status_code=202,
        response_model=JobView,
        summary="Create a job with your own id (repeating it is safe)",
        responses={200: {"model": JobView, "description": "Already exists, or finished"}},
    )
    async def put_job(
        request: Request,
        job_id: JobId,
        body: request_model,  # type: ignore[valid-type]
        prefer: Annotated[str | None, Header()] = None,
    ) -> Response:
        job, created = await submit(request, body, job_id)
        return await job_response(state, request, job, created, prefer)

    @router.get("/{job_id}", response_model=JobView, summary="Get a job")
    async def get_job(
        request: Request,
        job_id: JobId,
        prefer: Annotated[
            str | None,
            Header(description="`return=representation`: small outputs inline (`data`)"),
        ] = None,
    ) -> Response:
        view, inlined = await view_of(state, request, state.store.get(job_id), prefer)
        headers = {"preference-applied": "return=representation"} if inlined else None
        return view_response(view, 200, headers)

    @router.get("", response_model=JobList, summary="List jobs, newest first")
    async def list_jobs(
        request: Request,
        status: JobStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    ) -> JobList:
        page = state.store.page(status, limit, cursor)
        base = state.base_url(request)
        return JobList(jobs=[job_view(j, base) for j in page.jobs], next_cursor=page.next_cursor)

    @router.post("/{job_id}/cancel", response_model=JobView, summary="Cancel a job (idempotent)")
    async def cancel_job(request: Request, job_id: JobId) -> JobView:
        job = state.store.get(job_id)
        if job.is_parent and state.graphs is not None:  # and every part not finished
            job = await state.graphs.cancel(job_id)
        else:
            job = await state.runner.cancel(job_id)
        return job_view(job, state.base_url(request), state.children(job))

    @router.post(
        "/{job_id}/retry",
        response_model=JobView,
        summary="Run a failed or canceled job again (a long video: its failed parts)",
    )
    async def retry_job(request: Request, job_id: JobId) -> JobView:
        job = state.store.get(job_id)
        if job.parent_id is not None:  # a part: the long video it belongs to
            job = state.store.get(job.parent_id)
        if job.is_parent and state.graphs is not None:
            job = await state.graphs.retry(job.id)
        else:
            job = state.runner.retry(job.id)
        return job_view(job, state.base_url(request), state.children(job))

    @router.get(
        "/{job_id}/events",
        response_class=EventSourceResponse,
        summary="Server-sent events: `status` and `progress`, ending after a terminal status",
    )
    async def job_events(
        request: Request, job_id: Annotated[str, Depends(existing_job)]
    ) -> AsyncIterator[ServerSentEvent]:
        base = state.base_url(request)
        async with state.bus.subscribe(job_id) as events:
            job = state.store.get(job_id)
            yield _sse("status", job, base, state.children(job))
            while not job.status.is_terminal:
                try:
                    async with asyncio.timeout(RECHECK_S):
                        event = await events.get()
                except TimeoutError:
                    latest = state.store.get(job_id)
                    if latest.status is not job.status:
                        job = latest
                        yield _sse("status", job, base, state.children(job))
                    continue
                job = event.job
                yield _sse(event.kind, job, base, state.children(job))

    @router.get("/{job_id}/logs", response_model=JobLog, summary="A job's own log")
    async def job_log(job_id: JobId) -> JobLog:
        job = state.store.get(job_id)
        live = JOB_LOGS.peek(job_id)  # running here (or being stored): the lines so far
        if live is not None:  # an ended job's lines are all there before its end is recorded
            return JobLog(
                job_id=job_id, status=job.status, complete=job.status.is_terminal, lines=live
            )
        stored = state.store.job_log(job_id)
        return JobLog(
            job_id=job_id,
            status=job.status,
            complete=job.status.is_terminal,
            lines=stored or [],
        )

    @router.get(
        "/{job_id}/outputs/{name}",
        summary="Download an output (supports HTTP Range)",
        response_class=FileResponse,
    )
    async def get_output(
        request: Request, job_id: JobId, name: Annotated[str, Path(max_length=255)]
    ) -> Response:
        job = state.store.get(job_id)
        if state.pod_url and job.held_by and job.held_by != state.pod_url:
            # a fleet: another pod ran the job and holds its files
            target = f"{job.held_by.rstrip('/')}{request.url.path}"
            return RedirectResponse(target, status_code=307)
        if name not in job.outputs or job.outputs_expired:
            raise NotFound(
                f"job {job_id} has no output {name!r}"
                + (" (deleted by the retention policy)" if job.outputs_expired else ""),
                job_id=job_id,
            )
        path = state.settings.job_dir(job_id) / "outputs" / name
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            raise NotFound(f"output {name!r} of job {job_id} is missing on disk", job_id=job_id)
        response = FileResponse(path, filename=name, stat_result=stat)
        if stat.st_size > SMALL_OUTPUT_BYTES or "range" in request.headers:
            return response  # streamed by worker threads, with HTTP Range
        # small and whole: one read here instead of a worker thread per open/read/close
        return Response(path.read_bytes(), headers=dict(response.headers))

    return router


def _sse(kind: str, job: Job, base_url: str, children: list[Job] | None) -> ServerSentEvent:
    return ServerSentEvent(event=kind, raw_data=job_view(job, base_url, children).model_dump_json())
