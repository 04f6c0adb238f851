"""`MODE=serverless`: the service as a RunPod serverless worker, on the same job engine.

`serve` hands `runpod.serverless.start` an async handler. The SDK runs its job loop on one
event loop of its own (`asyncio.run` in its job scaler; uvicorn's loop for the local
`--rp_serve_api` server), and runs each job as a task there, so the service (store,
runner, engine: `api.app.build_state`) is built and started on that loop too: at the
SDK's first `concurrency_modifier` call, made in that loop before the first job is taken
(models load while the worker waits for work), or else at the first job.

A RunPod job is submitted with RunPod's id as ours (a job delivered twice runs once) and
awaited; its progress goes to `runpod.serverless.progress_update`. RunPod stops a job
(`/cancel`, execution timeout) by cancelling the handler's task: the handler cancels our
job through the runner and re-raises. A `cuda_error` also returns `refresh_worker`, so
RunPod replaces the worker.

A worker-comfyui request (`{"workflow", "images"}`, no `files`) runs as our custom workflow
and is answered in worker-comfyui's shape (`model_service.compat.worker_comfyui`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from model_service.api.app import build_state, running
from model_service.api.state import ServiceState
from model_service.compat import worker_comfyui
from model_service.errors import ServiceError
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.jobs.store import JobReader
from model_service.jobs.view import Output, job_view
from model_service.logs import get_logger
from model_service.service import ServiceSpec
from model_service.settings import Settings

log = get_logger("model_service.serverless")

# RunPod's payload limits: /run 10 MB, /runsync 20 MB (docs.runpod.io/serverless/endpoints/
# operation-reference). A worker cannot tell which one a job came from, so a result with
# inline outputs keeps under the smaller one; RunPod refuses larger ones ("Failed to return
# job results | 400", runpod-workers/worker-comfyui#129). Read once, at start-up; the
# environment variable exists for tests.
MAX_INLINE_BYTES = int(os.environ.get("SERVERLESS_MAX_INLINE_BYTES", 10_000_000))
PROGRESS_INTERVAL_S = 0.5  # at most one progress update per this long
REFRESH_CODES = frozenset({"cuda_error"})  # the worker process is poisoned: replace it
_RERUN = frozenset({JobStatus.FAILED, JobStatus.CANCELED})

ProgressSend = Callable[[dict[str, Any], dict[str, Any]], None]
Failure = Callable[[dict[str, Any], bool], dict[str, Any]]  # (error, refresh_worker) -> result


def serve(spec: ServiceSpec, settings: Settings) -> None:
    """Run as a RunPod serverless worker until RunPod stops it."""
    # The SDK's automatic system checks import torch into this process and keep a CUDA
    # context here; the model's own process needs that memory. Its GPU check (a separate
    # binary) still runs. RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=false turns them back on.
    os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    # the SDK logs each poll for work at its default level, DEBUG: follow LOG_LEVEL
    level = settings.log_level.upper()
    os.environ.setdefault("RUNPOD_LOG_LEVEL", {"WARNING": "WARN"}.get(level, level))
    import runpod  # type: ignore[import-untyped]  # its logger reads RUNPOD_LOG_LEVEL now

    # progress is posted to RunPod's job-done URL; off RunPod (local runs) it is only logged
    on_runpod = "RUNPOD_WEBHOOK_POST_OUTPUT" in os.environ
    send = runpod.serverless.progress_update if on_runpod else _log_progress
    worker = ServerlessWorker(spec, settings, send)
    runpod.serverless.start(
        {"handler": worker.handler, "concurrency_modifier": worker.concurrency_modifier}
    )


class ServerlessWorker:
    def __init__(self, spec: ServiceSpec, settings: Settings, send_progress: ProgressSend) -> None:
        self._spec = spec
        self._settings = settings
        self._send_progress = send_progress
        self._state: asyncio.Future[ServiceState] | None = None
        self._lifetime: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly

    def concurrency_modifier(self, current: int) -> int:
        """Called by the SDK in its loop before each job take: starts the service there.
        One job at a time: the runner runs one, others are better off on other workers."""
        self._start()
        return 1

    def _start(self) -> asyncio.Future[ServiceState]:
        if self._state is None:
            self._state = asyncio.get_running_loop().create_future()
            self._lifetime = asyncio.create_task(self._live(self._state), name="service")
        return self._state

    async def _live(self, ready: asyncio.Future[ServiceState]) -> None:
        """The service's lifetime: until the SDK's loop ends and cancels this task."""
        try:
            state = build_state(self._spec, self._settings)
            async with running(state):
                ready.set_result(state)
                await asyncio.Event().wait()
        except Exception as exc:  # every job then fails with it
            log.exception("the service failed")
            if not ready.done():
                ready.set_exception(exc)

    async def handler(self, job: dict[str, Any]) -> dict[str, Any]:
        """One RunPod job: `{"id", "input"}` -> our result, or `{"error": ...}`."""
        raw_input = job.get("input")
        compat = worker_comfyui.is_request(worker_comfyui.parsed(raw_input))
        fail: Failure = worker_comfyui.failure if compat else _failure
        state = await asyncio.shield(self._start())  # a cancelled job must not cancel it
        try:
            if compat:
                raw_input = worker_comfyui.to_custom_input(worker_comfyui.parsed(raw_input))
            record, _created = await state.submitter.submit(
                raw_input,
                job_id=job_id_for(state.store, str(job["id"])),
                webhook=None,  # RunPod calls the request's own webhook
                webhook_events=None,
                base_url=self._settings.public_url or "",
            )
        except ServiceError as exc:
            return fail(exc.to_dict(), False)
        with structlog.contextvars.bound_contextvars(job_id=record.id):
            progress = ProgressReporter(job, self._send_progress)
            try:
                record = await _wait(state, record.id, progress)
            except asyncio.CancelledError:
                log.info("RunPod stopped the job; canceling it")
                await state.runner.cancel(record.id)
                raise
            except _Unusable as exc:  # e.g. no GPU: no job will ever run on this worker
                log.error("this worker cannot run jobs; asking RunPod for another", reason=exc)
                await state.runner.cancel(record.id)
                error = {
                    "code": "not_ready",
                    "message": f"this worker cannot run jobs: {exc}; RunPod replaces it, "
                    "retry the job",
                }
                return fail(error, True)
            return await self._result(record, compat)

    async def _result(self, job: Job, compat: bool = False) -> dict[str, Any]:
        if job.status is not JobStatus.SUCCEEDED:
            error = job.error or {"code": "canceled", "message": "the job was canceled"}
            refresh = error.get("code") in REFRESH_CODES
            return (worker_comfyui.failure if compat else _failure)(error, refresh)
        view = job_view(job, self._settings.public_url or "")
        directory = self._settings.job_dir(job.id) / "outputs"
        if compat:
            listed = await asyncio.to_thread(
                worker_comfyui.images, view.outputs, directory, MAX_INLINE_BYTES
            )
            if listed is None:
                return worker_comfyui.failure(worker_comfyui.too_large(MAX_INLINE_BYTES))
            return worker_comfyui.answer(listed)
        outputs = await asyncio.to_thread(result_outputs, view.outputs, directory)
        result = {
            "status": job.status.value,
            "seed": job.seed,
            "outputs": outputs,
            "info": job.info,
            "timings": view.timings.model_dump(mode="json"),
        }
        if outputs is None or len(json.dumps(result)) > MAX_INLINE_BYTES:
            return _failure(
                {
                    "code": "output_too_large",
                    "message": "the outputs are too large to return inline in a RunPod job "
                    f"result (at most {MAX_INLINE_BYTES} bytes of JSON, base64 included); "
                    "configure S3_BUCKET (object storage) to get URLs instead",
                    "limit_bytes": MAX_INLINE_BYTES,
                }
            )
        return result


class ProgressReporter:
    """Sends a job's progress to RunPod (its `/status` shows it as `output` while the job
    runs) at most once per `interval_s`. The last step is left to the result: updates are
    posted by threads that can land after it (runpod-python#250)."""

    def __init__(
        self,
        job: dict[str, Any],
        send: ProgressSend,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._job = job
        self._send = send
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = float("-inf")

    def __call__(self, step: int, total: int) -> None:
        now = self._clock()
        if total <= 0 or step >= total or now < self._next_at:
            return
        self._next_at = now + self._interval_s
        self._send(self._job, {"step": step, "total": total, "fraction": round(step / total, 4)})


class _Unusable(Exception):
    """The engine will never become ready on this worker (its reason is the message)."""


async def _wait(state: ServiceState, job_id: str, progress: ProgressReporter) -> Job:
    """The job once it has ended; its progress goes to `progress` meanwhile. Raises
    `_Unusable` if the engine turns out never to become ready."""
    blocked = asyncio.ensure_future(state.runner.wait_blocked())
    try:
        async with state.bus.subscribe(job_id) as events:
            job = state.store.get(job_id)
            while not job.status.is_terminal:
                event_task = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait(
                    {event_task, blocked}, return_when=asyncio.FIRST_COMPLETED
                )
                if event_task not in done:
                    event_task.cancel()
                    raise _Unusable(blocked.result())
                event = event_task.result()
                job = event.job
                if event.kind == "progress":
                    progress(job.progress_step, job.progress_total)
    finally:
        blocked.cancel()
    return state.store.get(job_id)


def job_id_for(store: JobReader, runpod_id: str) -> str:
    """RunPod's id, so a job delivered again attaches to the first run. RunPod's `/retry`
    re-queues a failed or timed-out job under its id: that one runs again, as `<id>.2`..."""
    job_id, attempt = runpod_id, 1
    while (old := store.find(job_id)) is not None and (
        old.status in _RERUN or old.cancel_requested
    ):
        attempt += 1
        job_id = f"{runpod_id}.{attempt}"
    return job_id


def result_outputs(outputs: list[Output], directory: Path) -> list[dict[str, Any]] | None:
    """Each output with the URL it was uploaded to, or else inline as base64; None when
    the inline ones alone are over the limit (checked before any file is read)."""
    sizes = {out.name: (directory / out.name).stat().st_size for out in outputs}
    inline = [out for out in outputs if out.storage_url is None]
    if sum(4 * ((sizes[out.name] + 2) // 3) for out in inline) > MAX_INLINE_BYTES:  # base64
        return None
    listed = []
    for out in outputs:
        item: dict[str, Any] = {
            "name": out.name,
            "content_type": out.content_type,
            "size": sizes[out.name],
        }
        if out.storage_url is not None:
            item["url"] = out.storage_url
        else:
            item["base64"] = base64.b64encode((directory / out.name).read_bytes()).decode()
        listed.append(item)
    return listed


def _failure(error: dict[str, Any], refresh_worker: bool = False) -> dict[str, Any]:
    """A failed RunPod job. The SDK wants `error` as a string (a dict ends the job as
    COMPLETED, runpod-python#299): our `{"code", "message", ...}` as JSON."""
    result: dict[str, Any] = {"error": json.dumps(error)}
    if refresh_worker:
        result["refresh_worker"] = True
    return result


def _log_progress(job: dict[str, Any], progress: dict[str, Any]) -> None:
    log.debug("progress", **progress)
