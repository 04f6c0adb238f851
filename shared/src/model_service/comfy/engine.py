"""The engine of the ComfyUI services: jobs run as prompts on an embedded ComfyUI.

Start-up, in the background (each stage shows in `/ready`):

1. models: PROFILE=tiny generates the tiny stand-ins of the manifest's files into a
   folder of their own (`MODELS_DIR/tiny`); a service with `download_at_start` (the
   network-storage images) downloads what is missing into MODELS_DIR;
2. ComfyUI: launched by the supervisor (or watched at COMFYUI_URL);
3. checks: each workflow against ComfyUI's `/object_info`: a missing node class, input
   or model file keeps `/ready` at 503 naming it (checked again every few seconds
   while something is missing, and after each ComfyUI restart);
4. warm-up (WARMUP, when the service declares a `warmup_input`): one small prompt of the
   service's own workflow, run like a job but not one (no job record, webhook or job
   metric; its outputs deleted), so that ComfyUI loads the models before `/ready` says
   200 and the first job pays no load time. Again after a ComfyUI restart; a failure is
   logged and the service becomes ready anyway (a job then meets the real error).

`startup` (shown by `/ready`) names the stage and how long each one took.

A job: its LoRAs are fetched into the LoRA cache, its media inputs are uploaded to ComfyUI
(`/upload/image`), the workflow is bound to its values, each LoRA is checked against the
diffusion model it patches (model_service.lora_fit), the graph is queued with our client
id, followed to its end (`ComfyClient.run`; ComfyUI's log lines about LoRAs that did not
apply fail it: comfy.lora_log), and every output is streamed into the job's folder. The
runner hands over the next job while one runs: it is prepared and queued in ComfyUI's own
queue behind the running one (prompts queued in the order the jobs came), so ComfyUI
starts it the moment the other ends. Cancel interrupts or dequeues only our prompt. When
ComfyUI dies, the job it was running fails with `backend_crashed` and the jobs still
waiting come back `not_started` (the runner queues them again); the supervisor starts a
new ComfyUI. A CUDA error restarts ComfyUI on purpose (the process is poisoned);
out-of-memory asks ComfyUI to free its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_service import gpu
from model_service.background import BACKOFF_S
from model_service.comfy.client import ComfyClient, ComfyProgress, OutputFile, RunResult
from model_service.comfy.custom import FILE_INPUTS, CustomWorkflows
from model_service.comfy.errors import (
    ComfyCrashed,
    ComfyCudaError,
    ComfyInterrupted,
    ComfyUnavailable,
)
from model_service.comfy.lora_log import PROMPT_ENDED, LoraLogWatch
from model_service.comfy.supervisor import ComfyState, ComfySupervisor
from model_service.comfy.workflow import (
    LAST_FRAME_STEM,
    Workflow,
    add_last_frame,
    diffusion_model_of,
    sampler_steps,
)
from model_service.errors import LoraInvalid, NotReady, ProvisionError, ServiceError
from model_service.fetch import SafeHttpClient
from model_service.job_logs import JOB_LOGS
from model_service.logs import get_logger
from model_service.lora_fit import check_lora_fit, convert_names, read_shapes
from model_service.loras import LoraCache, LoraHandle, parse_lora_source
from model_service.metrics import Metrics
from model_service.provision import Manifest, ProvisionMetrics, provision
from model_service.settings import Settings
from model_service.worker.protocol import JobDone, JobProgress, RunJob

log = get_logger("model_service.comfy")

UPLOAD_SUBFOLDER = "jobs"
_PROVISION_RETRY_S = (10.0, 30.0, 60.0, 300.0)
LORA_CACHE_FOLDER = "cache"  # under the models' `loras` folder, so ComfyUI lists them
MAX_LORA_BYTES = 2 * 2**30
LORA_FETCH_TIMEOUT_S = 1800.0
_LOST_BACKOFF_S = 1.0
_BLOCKED_RECHECK_S = 5.0  # while a model file is missing: soon ready once it is there
# an input key set by the long-video coordinator (never by a caller: input models forbid
# extra keys): also save the video's last frame as `last_frame.png`
WANT_LAST_FRAME = "_last_frame"
CUSTOM_WORKFLOW = "workflow"  # a job that brings its own graph (model_service.comfy.custom)


@dataclass(frozen=True)
class ComfyServiceSpec:
    """What a ComfyUI service declares: its workflows and its model files. It builds the
    service's engine, and the submitter's hook for custom workflows."""

    workflows: Mapping[str, Workflow]
    choose: Callable[[Mapping[str, Any]], str]  # a job's input -> the workflow's name
    manifest: Path  # the model files (JSON, see model_service.provision.manifest)
    download_at_start: bool = False  # network-storage images: True; packed images: False
    # the input field that lists the job's LoRAs (`[{source, strength, applies_to}]`): the
    # engine puts each in the LoRA cache and gives the workflow its ComfyUI `lora_name`,
    # checks that it fits the diffusion model(s) it patches, and fails the job when
    # ComfyUI logs that it did not apply
    lora_field: str | None = None
    lora_base: str = "this service's model"  # what job LoRAs must be trained for, for advice
    # more values from the job's own (local) files before they go to ComfyUI, e.g. the
    # frame count and windows an audio file's length asks for; merged into the values
    derive: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    # the warm-up job's input (WARMUP): given a scratch folder for the files it needs,
    # the values a job of the service's own workflow gets (as its input model dumps
    # them), at the smallest size; None: no warm-up
    warmup_input: Callable[[Path], Mapping[str, Any]] | None = None

    def build_engine(
        self, settings: Settings, metrics: Metrics, blocker: str | None
    ) -> ComfyEngine:
        return ComfyEngine(settings, self, metrics, blocker=blocker)

    def custom_input(self, settings: Settings, engine: ComfyEngine) -> CustomWorkflows | None:
        """The submitter's hook for jobs that bring their own workflow (when allowed)."""
        if not settings.allow_custom_workflows:
            return None
        return CustomWorkflows(settings, engine.object_info)


def models_dir_for(settings: Settings) -> Path:
    """Where ComfyUI finds the models: MODELS_DIR, or its `tiny` folder in PROFILE=tiny
    (never a folder with real weights in it)."""
    base = settings.models_dir.absolute()
    return base / "tiny" if settings.profile == "tiny" else base


class ComfyEngine:
    def __init__(
        self,
        settings: Settings,
        spec: ComfyServiceSpec,
        metrics: Metrics,
        *,
        supervisor: ComfySupervisor | None = None,
        recheck_s: float = 1.0,
        blocker: str | None = None,
    ) -> None:
        self._settings = settings
        self._spec = spec
        self._metrics = metrics
        self._models_dir = models_dir_for(settings)
        self._manifest = Manifest.load(spec.manifest)
        comfy_settings = settings.model_copy(update={"models_dir": self._models_dir})
        self._supervisor = supervisor or ComfySupervisor.from_settings(
            comfy_settings, on_crash=self._on_crash, on_restart=self._on_restart
        )
        self._client = ComfyClient(self._supervisor.url, cancel_grace_s=settings.cancel_grace_s)
        self._loras = (
            LoraCache(
                self._models_dir / "loras" / LORA_CACHE_FOLDER,
                max_bytes=int(settings.lora_cache_gb * 1e9),
                http=SafeHttpClient(
                    allow_networks=settings.fetch_allow_networks,
                    max_bytes=MAX_LORA_BYTES,
                    timeout_s=LORA_FETCH_TIMEOUT_S,
                ),
                hf_endpoint=settings.hf_endpoint,
                max_file_bytes=MAX_LORA_BYTES,
                civitai_token=settings.civitai_token,
            )
            if spec.lora_field
            else None
        )
        self._recheck_s = recheck_s
        self._stage = "starting"
        self._started_at = time.monotonic()
        self._stages: list[list[Any]] = []  # [name, began (monotonic), ended or None]
        self._warmup = settings.warmup and spec.warmup_input is not None
        self._warmed_run = -1  # the supervisor restart count the warm-up ran for
        self._blocker: str | None = None  # a workflow check failed: what is missing
        self._fatal = blocker  # cannot work until an operator acts (e.g. no GPU)
        self._trouble: str | None = None  # a bug stopped the preparation: starting over
        self._provision_metrics: ProvisionMetrics | None = None
        self._checked_run = -1  # the supervisor restart count the checks passed for
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._info: dict[str, Any] = {}
        self._object_info: dict[str, Any] | None = None  # cached since the last (re)start
        self._runs: dict[str, _Running] = {}  # by job id: the running job, those waiting
        self._last_queued: asyncio.Future[None] | None = None  # the latest job's turn

    # --- what the service reads ------------------------------------------------------

    @property
    def readiness(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, self._fatal
        if self._trouble is not None:
            return False, self._trouble
        if self._stage != "comfyui":
            return False, self._stage
        ok, reason = self._supervisor.readiness
        if not ok:
            return False, f"ComfyUI: {reason}"
        if self._blocker is not None:
            return False, self._blocker
        if self._checked_run != self._supervisor.restarts:
            return False, "checking the workflows against ComfyUI"
        if self._warmup and self._warmed_run != self._supervisor.restarts:
            return False, "warming up: ComfyUI loads the models with a small prompt (WARMUP)"
        return True, "ready"

    @property
    def startup(self) -> dict[str, Any]:
        """The start-up stage now and each stage's duration so far, for `/ready`."""
        now = time.monotonic()
        ok, _ = self.readiness
        stage = "ready" if ok else "failed" if self._fatal else self._phase()
        return {
            "stage": stage,
            "stages": [
                {"stage": name, "s": round((ended or now) - began, 2)}
                for name, began, ended in self._stages
            ],
            "since_start_s": round(now - self._started_at, 2),
        }

    def _phase(self) -> str:
        return self._stages[-1][0] if self._stages else "starting"

    def _enter(self, stage: str) -> None:
        """A new start-up stage (`ready` ends them; a ComfyUI restart starts them again)."""
        if self._stages and self._stages[-1][0] == stage:
            return
        now = time.monotonic()
        if self._stages and self._stages[-1][2] is None:
            self._stages[-1][2] = now
        if stage == "ready":
            took = {name: round(ended - began, 2) for name, began, ended in self._stages[-8:]}
            log.info("ComfyUI engine ready", since_start_s=round(now - self._started_at, 2), **took)
        self._stages.append([stage, now, now if stage == "ready" else None])
        del self._stages[:-20]  # a service restarting ComfyUI often keeps the latest
        self._notify()

    @property
    def info(self) -> dict[str, Any]:
        return {
            **self._info,
            "backend": "comfyui",
            "comfyui_url": self._supervisor.url,
            "models_dir": str(self._models_dir),
            "workflows": sorted(self._spec.workflows),
        }

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._fatal is not None:
            return
        self._task = asyncio.create_task(self._keep_preparing(), name="comfy-engine")
        self._task.add_done_callback(self._prepare_ended)

    def _prepare_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fatal = f"ComfyUI engine stopped by a bug: {task.exception()!r}; restart"
            log.error("comfy engine crashed", exc_info=task.exception())
            self._notify()

    async def stop(self, *, abandon_running: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if abandon_running:  # they run again after our restart
            for running in list(self._runs.values()):
                with contextlib.suppress(ServiceError, TimeoutError):
                    await asyncio.wait_for(self._client.cancel(running.prompt_id), 5.0)
        await self._client.close()
        await self._supervisor.stop()

    async def wait_ready(self) -> bool:
        while True:
            if self._fatal is not None:
                return False
            if self.readiness[0]:
                return True
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 1.0)

    def _notify(self) -> None:
        self._changed.set()

    async def _keep_preparing(self) -> None:
        """`_prepare`, started over after a backoff when a bug stops it (logged once;
        `/ready` says so meanwhile) instead of leaving the service down until a restart."""
        failures = 0
        while True:
            try:
                await self._prepare()
                return
            except Exception as exc:
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                if self._trouble is None:
                    log.error("comfy engine failed; starting over", exc_info=exc)
                self._trouble = f"ComfyUI engine failed ({exc!r}); retrying by itself"
                self._notify()
                await asyncio.sleep(delay)

    async def _prepare(self) -> None:
        await self._provide_models()
        self._stage = "comfyui"
        self._enter("starting ComfyUI")
        await self._supervisor.start()
        while True:
            if self._supervisor.state is ComfyState.FAILED:
                self._fatal = f"ComfyUI cannot start: {self._supervisor.reason}"
                self._notify()
                return
            if not await self._supervisor.wait_ready(self._recheck_s):
                self._enter("starting ComfyUI")  # again, after a restart
                continue
            self._trouble = None
            runs = self._supervisor.restarts
            if self._checked_run != runs or self._blocker is not None:
                self._enter("checking workflows")
                await self._check_workflows(runs)
            checked = self._checked_run == runs and self._blocker is None
            if checked and self._warmup and self._warmed_run != runs:
                self._enter("warming up")
                await self._warm_up(runs)
            if self.readiness[0]:
                self._enter("ready")
            await asyncio.sleep(_BLOCKED_RECHECK_S if self._blocker else self._recheck_s)

    async def _warm_up(self, runs: int) -> None:
        """One prompt of the service's own workflow at `warmup_input` (the smallest size),
        as a job would run it but not as one: no job record, webhook or job metric, its
        outputs and scratch files deleted. ComfyUI keeps the loaded models (and the
        loaders' cached outputs) for the jobs that follow."""
        assert self._spec.warmup_input is not None
        scratch = self._settings.data_dir.absolute() / "warmup"
        began = time.monotonic()
        try:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
            (scratch / "inputs").mkdir(parents=True)
            inputs = dict(await asyncio.to_thread(self._spec.warmup_input, scratch / "inputs"))
            prompt_id = str(uuid.uuid4())
            job = RunJob(f"warmup-{prompt_id[:8]}", inputs, str(scratch / "outputs"), 0)
            task = asyncio.current_task()
            assert task is not None
            running = _Running(
                job.job_id,
                f"warmup-{prompt_id[:8]}",
                prompt_id,
                task,
                on_started=lambda: None,
                after=None,
                queued=asyncio.get_running_loop().create_future(),
            )
            done = await self._run(job, running, lambda _progress: None)
            log.info(
                "warm-up done: the models are loaded",
                warmup_s=round(time.monotonic() - began, 2),
                comfy_execution_s=done.info.get("comfy_execution_s"),
            )
        except (ServiceError, OSError, ValueError, TimeoutError) as exc:
            # ready anyway: the jobs then meet (and report) the real error themselves
            message = exc.message if isinstance(exc, ServiceError) else repr(exc)
            log.error(
                "warm-up failed; the service becomes ready without it and the first job "
                "loads the models. Read the error (and ComfyUI's log lines above); set "
                "WARMUP=0 to skip the warm-up",
                error=message,
                warmup_s=round(time.monotonic() - began, 2),
            )
            self._warmup = False  # not again after a restart: no crash loop of warm-ups
            if isinstance(exc, ComfyCudaError):  # the process is poisoned, as after a job
                asyncio.get_running_loop().create_task(self._supervisor.restart("CUDA error"))
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        self._warmed_run = runs

    async def _provide_models(self) -> None:
        if self._settings.profile == "tiny":
            self._stage = "generating the tiny test models"
            self._enter("generating tiny models")
            from model_service.comfy.tiny_weights import materialize

            entries = [(f.tiny, f.path(self._models_dir)) for f in self._manifest.files if f.tiny]
            cache = self._models_dir / ".cache"
            if self._settings.comfyui_python:  # torch is there (the API venv may lack it)
                await _materialize_with(self._settings.comfyui_python, entries, cache)
            else:
                await asyncio.to_thread(materialize, entries, cache)
            return
        if not self._spec.download_at_start:
            return
        if self._provision_metrics is None:  # registered once (preparing may start over)
            self._provision_metrics = ProvisionMetrics(self._metrics.registry)
        metrics = self._provision_metrics
        for attempt in range(1_000_000):
            missing = self._manifest.missing(self._models_dir)
            if not missing:
                return
            total = sum(f.size_bytes for f in missing)
            self._enter("downloading models")
            self._stage = (
                f"downloading {len(missing)} model file(s), {total / 1e9:.1f} GB, to "
                f"{self._models_dir}"
            )
            self._notify()
            try:
                await provision(
                    self._manifest,
                    self._models_dir,
                    on_progress=self._download_progress,
                    metrics=metrics,
                    hf_endpoint=self._settings.hf_endpoint,
                )
                return
            except ProvisionError as exc:
                delay = _PROVISION_RETRY_S[min(attempt, len(_PROVISION_RETRY_S) - 1)]
                self._stage = f"model download failed, retrying in {delay:g} s: {exc.message}"
                log.error("model download failed", error=exc.message, retry_in_s=delay)
                self._notify()
                await asyncio.sleep(delay)

    def _download_progress(self, file: Any, done: int, total: int) -> None:
        self._stage = f"downloading models: {file.relpath} {done / 1e9:.2f} of {total / 1e9:.2f} GB"

    async def object_info(self) -> dict[str, Any]:
        """The running ComfyUI's node classes (cached until it restarts)."""
        if self._object_info is None or self._checked_run != self._supervisor.restarts:
            try:
                self._object_info = await self._client.object_info()
            except ServiceError as exc:
                raise NotReady(
                    f"ComfyUI cannot be asked about its nodes yet ({exc.message}); "
                    "retry when GET /ready answers 200",
                    retry_after_s=10,
                ) from exc
        return self._object_info

    async def _check_workflows(self, runs: int) -> None:
        try:
            object_info = await self._client.object_info()
            stats = await self._client.system_stats()
        except ServiceError as exc:
            log.warning("cannot read ComfyUI's object_info", error=exc.message)
            return
        self._object_info = object_info
        problems = [
            problem
            for workflow in self._spec.workflows.values()
            for problem in workflow.check(object_info, self._describe_file)
        ]
        unique = list(dict.fromkeys(problems))
        self._blocker = "; ".join(unique) if unique else None
        self._checked_run = runs
        self._info = {"comfyui_version": (stats.get("system") or {}).get("comfyui_version")}
        if unique:
            log.error("workflows cannot run on this ComfyUI", problems=unique)
        else:
            log.info("workflows checked against ComfyUI", workflows=sorted(self._spec.workflows))
        self._notify()

    def _describe_file(self, folder: str, name: str) -> str:
        for file in self._manifest.files:
            if file.folder == folder and file.name == name:
                where = self._models_dir / folder / name
                return (
                    f"expected at {where} ({file.size_bytes / 1e9:.2f} GB from "
                    f"{file.source.describe()}); run `model-service download --manifest "
                    f"{self._spec.manifest}` or fix MODELS_DIR"
                )
        return "not in the service's manifest"

    def _on_crash(self, reason: str) -> None:
        for running in list(self._runs.values()):
            running.crash = reason
            running.task.cancel()
        self._notify()

    def _on_restart(self, label: str) -> None:
        self._metrics.worker_restarts.labels(f"comfyui_{label}").inc()
        self._notify()

    # --- jobs --------------------------------------------------------------------------

    async def run(
        self,
        job: RunJob,
        on_progress: Callable[[JobProgress], None],
        on_started: Callable[[], None],
    ) -> JobDone:
        task = asyncio.current_task()
        assert task is not None
        prompt_id = str(uuid.uuid4())  # ComfyUI wants a UUID; a new one for each attempt
        # prompts are queued in the order the jobs came: each waits for the one before
        after, self._last_queued = self._last_queued, asyncio.get_running_loop().create_future()
        running = _Running(
            job.job_id,
            f"{job.job_id[:12]}-{prompt_id[:8]}",
            prompt_id,
            task,
            on_started=on_started,
            after=after,
            queued=self._last_queued,
        )
        self._runs[job.job_id] = running
        try:
            return await self._run(job, running, on_progress)
        except asyncio.CancelledError:
            if running.crash is None and not running.killed:
                raise
            if running.killed:
                return JobDone(job.job_id, canceled=True)
            return self._lost(job, running, running.crash or "")
        except ComfyCrashed as exc:
            return self._lost(job, running, exc.message)
        except ComfyUnavailable as exc:
            if running.started:
                return JobDone(job.job_id, error=exc.to_dict())
            # ComfyUI went away before this job began: it runs again once ComfyUI is
            # back (a moment for the supervisor to see it, so it is not taken at once)
            await asyncio.sleep(_LOST_BACKOFF_S)
            return self._lost(job, running, exc.message)
        except ComfyInterrupted:
            return JobDone(job.job_id, canceled=True)
        except ComfyCudaError as exc:
            log.error("CUDA error in ComfyUI; restarting it", error=exc.message)
            asyncio.get_running_loop().create_task(self._supervisor.restart("CUDA error"))
            return JobDone(job.job_id, error=exc.to_dict())
        except ServiceError as exc:
            return JobDone(job.job_id, error=exc.to_dict())
        finally:
            running.take_turn()  # the next job may queue its prompt (this one failed first)
            self._runs.pop(job.job_id, None)

    @staticmethod
    def _lost(job: RunJob, running: _Running, reason: str) -> JobDone:
        """ComfyUI died or restarted: the job it was running failed; one still waiting
        was not its cause and runs again."""
        if running.started:
            return JobDone(job.job_id, error=_crashed(reason, running.prompt_id))
        log.warning("ComfyUI restarted before this job began; it is queued again")
        return JobDone(job.job_id, not_started=True)

    async def _run(
        self, job: RunJob, running: _Running, on_progress: Callable[[JobProgress], None]
    ) -> JobDone:
        if CUSTOM_WORKFLOW in job.inputs:
            return await self._run_custom(job, running, on_progress)
        name = self._spec.choose(job.inputs)
        workflow = self._spec.workflows[name]
        values = {**job.inputs, "seed": job.seed}
        derived: dict[str, Any] = {}
        if self._spec.derive is not None:
            derived = dict(await asyncio.to_thread(self._spec.derive, values))
            values.update(derived)
        async with contextlib.AsyncExitStack() as held:
            loras = await self._take_loras(values, held)
            for field_name in workflow.media_fields:
                path = values.get(field_name)
                if path is not None:
                    values[field_name] = await self._upload(
                        Path(path), f"{running.tag}_{field_name}"
                    )
            graph = workflow.build(values, tag=running.tag)
            await self._check_lora_fit(graph, loras)
            stems = dict(workflow.outputs)
            if values.get(WANT_LAST_FRAME):
                stems.update(_last_frame_nodes(graph, workflow, running.tag))
            done = await self._queue_and_collect(
                job, running, on_progress, stems, name, graph, lora_keys=await _tensor_names(loras)
            )
        facts = {k: v for k, v in derived.items() if k not in workflow.media_fields}
        if facts:  # what the job's files asked for (frames, windows, ...), on the job
            done.info["derived"] = facts
        return done

    async def _run_custom(
        self, job: RunJob, running: _Running, on_progress: Callable[[JobProgress], None]
    ) -> JobDone:
        """A job's own workflow: its files uploaded and named in the graph, the output
        nodes' prefixes made unique (no cached result, no shared names), every output
        kept (`node<id>_<n>`)."""
        graph = copy.deepcopy(job.inputs[CUSTOM_WORKFLOW])
        uploaded = {}
        for name, path in (job.inputs.get("files") or {}).items():
            uploaded[name] = await self._upload(Path(path), f"{running.tag}_{Path(name).stem}")
        for node in graph.values():
            inputs = node.setdefault("inputs", {})
            for input_name, value in inputs.items():
                if (node["class_type"], input_name) in FILE_INPUTS and value in uploaded:
                    inputs[input_name] = uploaded[value]
            if isinstance(inputs.get("filename_prefix"), str):
                inputs["filename_prefix"] = f"{inputs['filename_prefix']}_{running.tag}"
        outputs = await self._output_nodes(graph)
        return await self._queue_and_collect(
            job, running, on_progress, {}, "custom", graph, expect=outputs
        )

    async def _output_nodes(self, graph: dict[str, Any]) -> list[str] | None:
        """A custom graph's output nodes (`output_node` in `/object_info`): when each
        reported its files on the websocket, `/history` need not be read. None when
        ComfyUI's node list cannot be read (then `/history` is)."""
        try:
            return output_nodes(graph, await self.object_info())
        except ServiceError:
            return None

    async def _take_loras(
        self, values: dict[str, Any], held: contextlib.AsyncExitStack
    ) -> dict[str, LoraHandle]:
        """Fetch (or find in the cache) the job's LoRAs, held until the job ends; each
        entry gets its ComfyUI `lora_name`. A bad or unreachable LoRA fails the job here,
        before ComfyUI does any work. Returns the handles by field (`input.loras[0].source`)."""
        field_name = self._spec.lora_field
        if self._loras is None or field_name is None or not values.get(field_name):
            return {}
        named, handles = [], {}
        for index, entry in enumerate(values[field_name]):
            where = f"input.{field_name}[{index}].source"
            source = parse_lora_source(entry["source"], field=where)
            handle = await self._loras.acquire(source, field=where)
            held.callback(handle.release)
            named.append({**entry, "lora_name": handle.name})
            handles[where] = handle
        values[field_name] = named
        return handles

    async def _check_lora_fit(self, graph: dict[str, Any], loras: Mapping[str, LoraHandle]) -> None:
        """Each job LoRA against the diffusion model(s) its loader nodes patch (the
        UNETLoader at the root of their model input: the expert of the chosen mode), from
        the files' headers, before anything is queued (model_service.lora_fit)."""
        for where, handle in loras.items():
            models = {
                self._models_dir / "diffusion_models" / unet
                for node_id, node in graph.items()
                if (node.get("inputs") or {}).get("lora_name") == handle.name
                and (unet := diffusion_model_of(graph, node_id)) is not None
            }
            await asyncio.to_thread(
                check_lora_fit,
                handle.path,
                sorted(models),
                field=where,
                source=handle.source.describe(),
                base=self._spec.lora_base,
            )

    async def _queue_and_collect(
        self,
        job: RunJob,
        running: _Running,
        on_progress: Callable[[JobProgress], None],
        stems: Mapping[str, str],
        name: str,
        graph: dict[str, Any],
        *,
        lora_keys: frozenset[str] | None = None,
        expect: list[str] | None = None,
    ) -> JobDone:
        if running.after is not None:  # the job before ours queues its prompt first
            await asyncio.shield(running.after)
        if running.cancel_requested:
            return JobDone(job.job_id, canceled=True)

        progress = _StepCounter(job.job_id, sampler_steps(graph), on_progress)
        watch = LoraLogWatch(lora_keys)
        own_lines = _JobLines(job.job_id)

        def on_line(line: str) -> None:
            own_lines(line)
            if lora_keys:
                watch(line)

        output_dir = Path(job.output_dir)

        def on_queued() -> None:
            running.take_turn()
            # while ComfyUI runs the prompt, not after (a mkdir can take a while)
            output_dir.mkdir(parents=True, exist_ok=True)

        # a launched ComfyUI runs on this machine's GPU: its use sampled while the job runs
        memory = None if self._supervisor.external else gpu.PeakMemory.here()
        if memory is not None:
            memory.start()

        def on_start() -> None:
            watch.started()
            own_lines.started()
            if memory is not None:
                memory.begin()
            running.start()

        started = time.monotonic()
        listening = lora_keys or JOB_LOGS.is_open(job.job_id)
        stop_listening = self._supervisor.listen(on_line) if listening else None
        try:
            result = await self._client.run(
                graph,
                on_progress=progress,
                # the wait behind the job before it is bounded by that job's own limit
                timeout_s=2 * (self._settings.job_timeout_s + self._settings.cancel_grace_s),
                prompt_id=running.prompt_id,
                # the output nodes whose files we need (the custom graph's: `expect`)
                expect_outputs=(expect or [node for node in stems if node in graph]) or None,
                on_queued=on_queued,
                on_start=on_start,
            )
        finally:
            if stop_listening is not None:
                stop_listening()
            peak_gb = None if memory is None else await memory.stop()
        names = await self._save_outputs(stems, result, output_dir)
        if watch.lines:  # the outputs are taken (out of ComfyUI's folder), the job fails
            raise _lora_not_applied(watch, self._spec)
        times = _execution_times(result)
        began, ended = times.get("comfy_started_ms"), times.get("comfy_ended_ms")
        return JobDone(
            job.job_id,
            outputs=names,
            info={
                "workflow": name,
                "comfy_prompt_id": result.prompt_id,
                "comfy_run_s": round(time.monotonic() - started, 3),
                **times,
                # the device's memory in use (ComfyUI's cached models too), at its peak
                **({} if peak_gb is None else {"peak_vram_gb": peak_gb}),
            },
            started_at=None if began is None else began / 1000,
            ended_at=None if ended is None else ended / 1000,
        )

    async def _upload(self, path: Path, stem: str) -> str:
        data = await asyncio.to_thread(path.read_bytes)
        return await self._client.upload(
            data, f"{stem}{path.suffix}", subfolder=UPLOAD_SUBFOLDER, overwrite=True
        )

    async def _save_outputs(
        self, stems: Mapping[str, str], result: RunResult, output_dir: Path
    ) -> list[str]:
        names: list[str] = []
        counts: dict[str, int] = {}
        for output in result.outputs:
            stem = stems.get(output.node_id) or f"node{output.node_id}"
            index = counts.get(stem, 0)
            counts[stem] = index + 1
            name = _output_name(stem, index, output)
            await self._take_output(output, output_dir / name)
            names.append(name)
        return names

    async def _take_output(self, output: OutputFile, dest: Path) -> None:
        """Move the file out of ComfyUI's output folder when it is ours and on this
        machine (a rename: no copy, and ComfyUI's folder does not grow); else `/view`.
        An image sent over the websocket (`SaveImageWebsocket`) is written as it came."""
        if output.data is not None:
            await asyncio.to_thread(_write_whole, dest, output.data)
            return
        source = _local_output(self._supervisor.output_dir, output)
        if source is not None:
            try:
                os.replace(source, dest)
                return
            except OSError:  # another filesystem, or already gone: fetch it
                pass
        await self._client.download(output, dest)

    def cancel(self, job_id: str) -> None:
        running = self._runs.get(job_id)
        if running is None or running.cancel_requested:
            return
        running.cancel_requested = True

        async def cancel_prompt() -> None:
            with contextlib.suppress(ServiceError):
                await self._client.cancel(running.prompt_id)

        asyncio.get_running_loop().create_task(cancel_prompt())

    def kill(self, job_id: str) -> None:
        """The prompt ignored its interrupt (a long node that never checks for one): stop
        waiting for it. ComfyUI itself is not restarted: it drops the prompt at its next
        interrupt check, and a restart would cost every loaded model."""
        running = self._runs.get(job_id)
        if running is not None:
            running.killed = True
            running.task.cancel()


@dataclass
class _Running:
    job_id: str
    tag: str  # unique per attempt: upload names and output prefixes
    prompt_id: str
    task: asyncio.Task[Any]
    on_started: Callable[[], None]
    after: asyncio.Future[None] | None  # done once the job before ours is queued (or gone)
    queued: asyncio.Future[None]  # ours: done once our prompt is queued (or we are gone)
    cancel_requested: bool = False
    killed: bool = False
    crash: str | None = None
    started: bool = False  # ComfyUI began our prompt

    def take_turn(self) -> None:
        if not self.queued.done():
            self.queued.set_result(None)

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.on_started()


async def _tensor_names(loras: Mapping[str, LoraHandle]) -> frozenset[str] | None:
    """The job's LoRA tensor names, as in the files and as ComfyUI renames them (the
    names its `lora key not loaded` lines give); None for a job without LoRAs."""
    if not loras:
        return None

    def read() -> frozenset[str]:
        names: set[str] = set()
        for handle in loras.values():
            shapes = read_shapes(handle.path)
            names.update(shapes, convert_names(shapes))
        return frozenset(names)

    return await asyncio.to_thread(read)


class _JobLines:
    """A launched ComfyUI's lines while the job's prompt runs (from its start to its
    `Prompt executed in`), into the job's own log (model_service.job_logs)."""

    def __init__(self, job_id: str) -> None:
        self._job_id = job_id
        self._on = self._ended = False

    def started(self) -> None:
        self._on = True

    def __call__(self, line: str) -> None:
        if self._on and not self._ended:
            JOB_LOGS.add(self._job_id, line, "comfyui")
            self._ended = PROMPT_ENDED.match(line) is not None


def _lora_not_applied(watch: LoraLogWatch, spec: ComfyServiceSpec) -> LoraInvalid:
    """ComfyUI ran the prompt but logged that a LoRA did not apply (comfy.lora_log)."""
    return LoraInvalid(
        f"input.{spec.lora_field}: ComfyUI did not apply the job's LoRAs in full: it logged "
        f"{watch.count} LoRA problem line(s), the first: {watch.lines[0][:300]!r}; a LoRA "
        f"is for another model size or architecture: use LoRAs trained for {spec.lora_base}",
        field=f"input.{spec.lora_field}",
        comfyui_log=watch.lines,
    )


def _crashed(reason: str, prompt_id: str) -> dict[str, Any]:
    error = ComfyCrashed(
        "ComfyUI died or restarted while running this job. Retry the job; if it crashes "
        "again, use a smaller size or fewer frames, and read the service logs",
        prompt_id=prompt_id,
        reason=reason[:500],
    )
    return error.to_dict()


def _last_frame_nodes(graph: dict[str, Any], workflow: Workflow, tag: str) -> dict[str, str]:
    """Adds the last-frame nodes after the workflow's video output: {SaveImage id: stem}."""
    for node_id, stem in workflow.outputs.items():
        if stem == "video" and node_id in graph:
            save = add_last_frame(graph, node_id)
            if save is not None:
                prefix = graph[save]["inputs"]["filename_prefix"]
                graph[save]["inputs"]["filename_prefix"] = f"{prefix}_{tag}"
                return {save: LAST_FRAME_STEM}
    return {}


def output_nodes(graph: Mapping[str, Any], object_info: Mapping[str, Any]) -> list[str]:
    """The ids of `graph`'s output nodes (their class has `output_node` in `/object_info`)."""
    return [
        node_id
        for node_id, node in graph.items()
        if (object_info.get(node.get("class_type")) or {}).get("output_node")
    ]


def _output_name(stem: str, index: int, output: OutputFile) -> str:
    suffix = Path(output.filename).suffix.lower()
    return f"{stem}{suffix}" if index == 0 else f"{stem}_{index}{suffix}"


async def _materialize_with(python: str, entries: list[tuple[str, Path]], cache: Path) -> None:
    """`tiny_weights.materialize` run by another interpreter (ComfyUI's, which has torch)."""
    from model_service.comfy import tiny_weights

    spec = json.dumps([[kind, str(path)] for kind, path in entries])
    process = await asyncio.create_subprocess_exec(
        python,
        tiny_weights.__file__,
        str(cache),
        spec,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-5:]
        raise ServiceError(
            f"generating the tiny models with {python} failed (exit {process.returncode}): "
            + " | ".join(tail)
        )


class _StepCounter:
    """ComfyUI counts steps per node; the job counts them across its samplers (two
    experts, or one sampler per InfiniteTalk window) so progress only goes up."""

    def __init__(
        self, job_id: str, expected: int, on_progress: Callable[[JobProgress], None]
    ) -> None:
        self._job_id = job_id
        self._expected = expected
        self._on_progress = on_progress
        self._node: str | None = None
        self._done = 0  # steps of the samplers that finished
        self._max = 0

    def __call__(self, event: ComfyProgress) -> None:
        if event.max <= 1:  # a node starting (0 of 1), not a sampler step
            return
        if event.node_id != self._node:
            if self._node is not None:
                self._done += self._max
            self._node = event.node_id
        self._max = event.max
        total = max(self._expected, self._done + event.max)
        self._on_progress(JobProgress(self._job_id, self._done + event.value, total))


def _local_output(root: Path | None, output: OutputFile) -> Path | None:
    """Where ComfyUI wrote `output` under `root`, if it is a plain file inside it."""
    if root is None or output.type != "output":
        return None
    path = (root / output.subfolder / output.filename).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return path


def _write_whole(dest: Path, data: bytes) -> None:
    partial = dest.with_name(dest.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, dest)


def _execution_times(result: RunResult) -> dict[str, Any]:
    """ComfyUI's own start and end of execution (ms timestamps in its history status)."""
    messages = (result.history.get("status") or {}).get("messages") or []
    stamps = {
        event: data.get("timestamp")
        for event, data in (m for m in messages if isinstance(m, list) and len(m) == 2)
        if isinstance(data, dict)
    }
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    if isinstance(start, int | float) and isinstance(end, int | float):
        return {
            "comfy_execution_s": round((end - start) / 1000, 3),
            # ComfyUI's clock (epoch ms): the gap between back-to-back jobs (bench/gap.py)
            "comfy_started_ms": start,
            "comfy_ended_ms": end,
        }
    return {}
