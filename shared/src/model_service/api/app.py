"""Builds the FastAPI app of one service from its spec and the settings."""

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial

from fastapi import FastAPI

from model_service import disk, gpu, retention
from model_service.api import console, jobs, loras, probes, uploads
from model_service.api import worker_comfyui as worker_comfyui_api
from model_service.api.middleware import ObserveMiddleware, install_error_handlers
from model_service.api.state import ServiceState
from model_service.engine import Engine, WorkerEngine
from model_service.errors import StoreUnavailable
from model_service.fetch import SafeHttpClient
from model_service.job_logs import JOB_LOGS
from model_service.jobs.events import EventBus
from model_service.jobs.graph import Composer, JobGraphs
from model_service.jobs.record import JobKind
from model_service.jobs.source import JobSource, LocalSource
from model_service.jobs.status import JobStatus
from model_service.jobs.store import JobStore, RunQueue, SqliteJobStore
from model_service.logs import get_logger
from model_service.metrics import Metrics, model_labels, weights_facts
from model_service.predictor import WorkerConfig
from model_service.runner import JobRunner
from model_service.service import ServiceSpec
from model_service.settings import Settings
from model_service.startup import prepare_data_dir
from model_service.submit import CustomInput, JobSubmitter
from model_service.webhooks import WebhookDispatcher

log = get_logger("model_service.app")


def build_state(spec: ServiceSpec, settings: Settings) -> ServiceState:
    prepare_data_dir(settings.data_dir)  # or exit, saying why
    JOB_LOGS.configure(settings.job_log_lines)  # the worker's: its WorkerConfig
    store: JobStore
    bus: EventBus
    if settings.queue_url:  # one pod of a fleet: records, events and queue on Redis
        from model_service.fleet.events import RedisEventBus
        from model_service.fleet.source import fleet_model
        from model_service.jobs.redis_store import RedisJobStore

        model = fleet_model(spec.name, settings)
        namespace = f"ms:{model}"
        store = RedisJobStore(settings.queue_url, namespace)
        bus = RedisEventBus(settings.queue_url, namespace)
    else:
        store = SqliteJobStore(settings.db_path)
        bus = EventBus()
    # the store publishes every write: to the bus first, then the webhooks (subscribed
    # by WebhookDispatcher), then the graph coordinator (from its start)
    bus.follow(store.changes)
    metrics = Metrics(
        spec.name,
        lambda: _or_nan(lambda: store.count(JobStatus.QUEUED)),
        lambda: _or_nan(lambda: _oldest_queued_s(store)),
    )
    http = SafeHttpClient(
        allow_networks=settings.fetch_allow_networks,
        max_bytes=settings.max_fetch_bytes,
        timeout_s=settings.fetch_timeout_s,
    )
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
        job_log_lines=settings.job_log_lines,
        threads=settings.worker_threads
        or (max(1, (os.cpu_count() or 2) - 1) if settings.profile == "tiny" else None),
        options=spec.worker_options(settings),
    )
    engine: Engine
    custom: CustomInput | None = None  # jobs that bring their own graph
    if spec.comfy is not None:
        comfy = spec.comfy.build_engine(settings, metrics, blocker)
        engine, custom = comfy, spec.comfy.custom_input(settings, comfy)
    else:
        assert spec.predictor is not None
        engine = WorkerEngine(spec.predictor, worker_config, metrics, blocker)
    # the info metric: what `/v1/service` says of the model, or the ComfyUI manifest's facts
    weights = (
        weights_facts(spec.comfy.manifest, [w.graph for w in spec.comfy.workflows.values()])
        if spec.comfy is not None
        else {}
    )
    metrics.describe(spec.version, lambda: model_labels(engine.info, weights))
    source: JobSource
    pod_url = None
    if settings.queue_url:
        from model_service.fleet.files import SharedFiles
        from model_service.fleet.queue import FleetQueue
        from model_service.fleet.source import FleetSource, own_url

        pod_url = own_url(settings, spec.default_port)
        queue = FleetQueue(
            settings.queue_url,
            model,
            heartbeat_s=settings.queue_heartbeat_s,
            max_attempts=settings.job_max_attempts,
        )
        ttl_s = int(settings.output_retention_hours * 3600)
        files = SharedFiles(settings.queue_url, namespace, ttl_s, settings.job_dir)
        source = FleetSource(settings, store, bus, metrics, queue, files, pod_url)
    else:
        source = LocalSource(settings, store)
    runner = JobRunner(settings, engine, store, bus, metrics, source)
    submitter = JobSubmitter(
        settings,
        spec.input_model,
        store,
        http,
        runner,
        check_input=spec.check_input,
        custom=custom,
        check_against_model=spec.check_against_model,
    )
    graphs = None
    if spec.long_video is not None:
        from model_service.longvideo.compose import (
            ChainComposer,
            JoinComposer,
            RedoComposer,
            TravelComposer,
        )

        composers: dict[JobKind, Composer] = {
            JobKind.CHAIN: ChainComposer(settings, spec.long_video.image_field),
            JobKind.TRAVEL: TravelComposer(settings),
            JobKind.JOIN: JoinComposer(settings),
            JobKind.REDO: RedoComposer(settings),
        }
        compositions = None
        if settings.queue_url:
            from model_service.fleet.compose import FleetCompositions
            from model_service.fleet.queue import FleetQueue

            compose_queue = FleetQueue(
                settings.queue_url,
                f"{model}:compose",
                heartbeat_s=settings.queue_heartbeat_s,
                max_attempts=settings.job_max_attempts,
            )
            compositions = FleetCompositions(compose_queue, metrics, settings.queue_heartbeat_s)
        graphs = JobGraphs(
            settings, store, runner, composers, held_by=pod_url or "", compositions=compositions
        )
    return ServiceState(
        spec, settings, store, bus, metrics, http, webhooks, runner, submitter, graphs, pod_url
    )


def _or_nan(read: Callable[[], float]) -> float:
    """A gauge's value, or NaN while the shared store is unreachable."""
    try:
        return float(read())
    except StoreUnavailable:
        return math.nan


def _oldest_queued_s(store: RunQueue) -> float:
    oldest = store.runnable(limit=1)
    return max(0.0, time.time() - oldest[0].created_at) if oldest else 0.0


@asynccontextmanager
async def running(state: ServiceState) -> AsyncIterator[None]:
    """The service's lifetime on the current event loop: runner, webhooks, retention
    (the HTTP app's lifespan, and the serverless worker's)."""
    tasks = state.runner.tasks  # each survives its own errors; /ready names one failing
    # the store's writes are published on this loop (retention's, from its thread, too)
    state.store.changes.bind(asyncio.get_running_loop())
    await state.bus.start(tasks)
    await state.runner.start()
    if state.graphs is not None:
        await state.graphs.start()
    background = [
        tasks.start("webhooks", state.webhooks.step, jobs_need_it=False),
        tasks.start(
            "retention",
            partial(retention.step, state.settings, state.store, state.pod_url or ""),
            jobs_need_it=False,
        ),
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
        await state.webhooks.stop()
        if state.graphs is not None:
            await state.graphs.stop()
        await state.runner.stop()
        await state.bus.stop()
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
    )
    app.state.service = state
    install_error_handlers(app)
    disk.install_handler(app)  # a full DATA_DIR: 503 disk_full
    app.add_middleware(
        ObserveMiddleware,
        api_keys=settings.api_keys,
        metrics=state.metrics,
        max_body_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.include_router(probes.build_router(state))
    app.include_router(jobs.build_router(state))
    app.include_router(uploads.build_router(state))
    app.include_router(loras.build_router(state))  # GET /v1/loras
    app.include_router(worker_comfyui_api.build_router(state))  # RunPod worker-comfyui clients
    app.include_router(console.build_router())  # the web console, GET /
    if state.graphs is not None:
        from model_service.longvideo import routes as long_video_routes

        app.include_router(long_video_routes.build_router(state))
    for router in spec.extra_routes(state):
        app.include_router(router)
    return app
