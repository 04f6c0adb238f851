"""Health, readiness, metrics and what the service is running."""

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from model_service import gpu
from model_service.api.console import LongVideoInfo, describe_input
from model_service.api.state import ServiceState
from model_service.media_refs import MediaKind


class ServiceView(BaseModel):
    name: str
    title: str
    version: str
    profile: str
    ready: bool
    reason: str
    model: dict[str, Any] = Field(description="Facts about the loaded model or backend.")
    gpus: list[dict[str, Any]]
    min_vram_gb: float
    input_schema: dict[str, Any] = Field(description="JSON schema of a job's `input`.")
    media: dict[str, MediaKind] = Field(
        description="Input fields that take a file (or a list of files): an https URL, a "
        "data URI or an upload id (POST /v1/uploads)."
    )
    long_video: LongVideoInfo | None = Field(
        description="Null: no long videos; else the routes and the input fields they use."
    )


def build_router(state: ServiceState) -> APIRouter:
    router = APIRouter(tags=["service"])
    described = describe_input(state.spec)  # the same for the service's lifetime

    @router.get("/health", summary="Liveness: the API process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/ready",
        summary="Readiness: 200 when a job can run, else 503 with the reason; a ComfyUI "
        "service adds its start-up `stage` (generating tiny models, downloading models, "
        "starting ComfyUI, checking workflows, warming up, ready) and each stage's seconds",
    )
    async def ready() -> JSONResponse:
        ok, reason = state.runner.readiness
        body: dict[str, Any] = {"ready": ok, "reason": reason}
        # only the ComfyUI engine has stages (a worker's start is one: loading the model)
        startup = getattr(state.runner.engine, "startup", None)
        if isinstance(startup, dict):
            body.update(startup)
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get(
        "/v1/service",
        response_model=ServiceView,
        summary="What this service runs (model, profile, GPU) and takes: the input's schema, "
        "its file fields, long videos",
    )
    async def service_info() -> ServiceView:
        ok, reason = state.runner.readiness
        return ServiceView(
            name=state.spec.name,
            title=state.spec.title,
            version=state.spec.version,
            profile=state.settings.profile,
            ready=ok,
            reason=reason,
            # what the engine says; the model's name and precision where it says none
            # (a ComfyUI service: its manifest's name, its diffusion models' dtype)
            model=state.metrics.model_facts() | state.runner.worker_info,
            gpus=[info.__dict__ for info in gpu.probe()],
            min_vram_gb=state.spec.min_vram_gb,
            input_schema=described.input_schema,
            media=described.media,
            long_video=described.long_video,
        )

    return router
