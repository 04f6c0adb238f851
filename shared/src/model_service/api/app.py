"""Builds the FastAPI app of one service from its spec and the settings."""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from model_service import gpu, retention
from model_service.api import jobs, probes, uploads
from model_service.api.middleware import ObserveMiddleware, install_error_handlers
from model_service.api.state import ServiceState
from model_service.engine import Engine, WorkerEngine
from model_service.fetch import SafeHttpClient
from model_service.jobs.events import EventBus
from model_service.jobs.graph import Composer, JobGraphs
from model_service.jobs.status import JobStatus
from model_service.jobs.store import JobStore
from model_service.logs import get_logger
from model_service.metrics import Metrics
from model_service.predictor import WorkerConfig
from model_service.runner import JobRunner
from model_service.service import ServiceSpec
from model_service.settings import Settings
from model_service.submit import JobSubmitter
from model_service.webhooks import WebhookDispatcher

log = get_logger("model_service.app")


def build_state(spec: ServiceSpec, settings: Settings) -> ServiceState:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.db_path)
    metrics = Metrics(spec.name, lambda: float(store.count(JobStatus.QUEUED)))
    http = SafeHttpClient(
        allow_networks=settings.fetch_allow_networks,
        max_bytes=settings.max_fetch_bytes,
        timeout_s=settings.fetch_timeout_s,
    )
    bus = EventBus()
    webhooks = WebhookDispatcher(settings, store, http, metrics)
    blocker = None
    runs_model_here = spec.comfy is None or not settings.comfyui_url  # else ComfyUI's host
    if settings.profile == "full" and runs_model_here:
        blocker = gpu.unmet_requirement(spec.min_vram_gb, gpu.probe())
    worker_config = WorkerConfig(
        profile=settings.profile,
        models_dir=settings.models_dir.resolve(),
        data_dir=settings.data_dir.resolve(),
        log_level=settings.log_level,
        log_format="json" if settings.log_format == "auto" else settings.log_format,
        threads=settings.worker_threads
        or (max(1, (os.cpu_count() or 2) - 1) if settings.profile == "tiny" else None),
        options=spec.worker_options(settings),
    )
    engine: Engine
    if spec.comfy is not None:
        from model_service.comfy.engine import ComfyEngine

        engine = ComfyEngine(settings, spec.comfy, metrics, blocker=blocker)
    else:
        assert spec.predictor is not None
        engine = WorkerEngine(spec.predictor, worker_config, metrics, blocker)
    runner = JobRunner(settings, engine, store, bus, metrics, webhooks)
    submitter = JobSubmitter(
        settings, spec.input_model, store, http, runner, check_input=spec.check_input
    )
    graphs = None
    if spec.long_video is not None:
        from model_service.longvideo.compose import ChainComposer, TravelComposer

        composers: dict[str, Composer] = {
            "chain": ChainComposer(settings, spec.long_video.image_field),
            "travel": TravelComposer(settings),
        }
        graphs = JobGraphs(settings, store, runner, composers)
    return ServiceState(
        spec, settings, store, bus, metrics, http, webhooks, runner, submitter, graphs
    )


@asynccontextmanager
async def running(state: ServiceState) -> AsyncIterator[None]:
    """The service's lifetime on the current event loop: runner, webhooks, retention
    (the HTTP app's lifespan, and the serverless worker's)."""
    await state.runner.start()
    if state.graphs is not None:
        await state.graphs.start()
    background = [
        asyncio.create_task(state.webhooks.run(), name="webhooks"),
        asyncio.create_task(retention.run_forever(state.settings, state.store), name="retention"),
    ]
    _ok, reason = state.runner.readiness
    log.info(
        "service started",
        service=state.spec.name,
        profile=state.settings.profile,
        mode=state.settings.mode,
        reason=reason,
    )
    try:
        yield
    finally:
        for task in background:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if state.graphs is not None:
            await state.graphs.stop()
        await state.runner.stop()
        await state.http.aclose()
        state.store.close()


def create_app(spec: ServiceSpec, settings: Settings) -> FastAPI:
    state = build_state(spec, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running(state):
            yield

    app = FastAPI(
        title=spec.title,
        version=spec.version,
        description=spec.description,
        lifespan=lifespan,
        max_body_size=max(settings.max_request_bytes, settings.max_upload_bytes + 2**20),
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(
        ObserveMiddleware,
        api_keys=settings.api_keys,
        metrics=state.metrics,
        max_body_bytes=settings.max_request_bytes,
    )
    app.include_router(probes.build_router(state))
    app.include_router(jobs.build_router(state))
    app.include_router(uploads.build_router(state))
    if state.graphs is not None:
        from model_service.longvideo import routes as long_video_routes

        app.include_router(long_video_routes.build_router(state))
    for router in spec.extra_routes(state):
        app.include_router(router)
    return app
