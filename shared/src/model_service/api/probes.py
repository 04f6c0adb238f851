"""Health, readiness, metrics and what the service is running."""

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model_service import gpu
from model_service.api.state import ServiceState


def build_router(state: ServiceState) -> APIRouter:
    router = APIRouter(tags=["service"])

    @router.get("/health", summary="Liveness: the API process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/ready", summary="Readiness: 200 when a job can run, else 503 with the reason")
    async def ready() -> JSONResponse:
        ok, reason = state.runner.readiness
        return JSONResponse({"ready": ok, "reason": reason}, status_code=200 if ok else 503)

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/service", summary="What this service runs: model, profile, GPU")
    async def service_info() -> dict[str, Any]:
        ok, reason = state.runner.readiness
        return {
            "name": state.spec.name,
            "title": state.spec.title,
            "version": state.spec.version,
            "profile": state.settings.profile,
            "ready": ok,
            "reason": reason,
            "model": state.runner.worker_info,
            "gpus": [info.__dict__ for info in gpu.probe()],
            "min_vram_gb": state.spec.min_vram_gb,
        }

    return router
