"""Prometheus metrics of one service process (one registry per app).

Every name on `/metrics` starts with `PREFIX` (`model_service_jobs_total`, ...), so that
a Prometheus shared with other applications tells ours apart. The metrics are declared
here under their short names (`jobs_total`) and the registry adds the prefix when it is
read, to every metric registered on it (provisioning's too). `model_service_info` (always
1) carries the service, its version, the model and its precision as labels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from model_service import gpu
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus

PREFIX = "model_service_"  # of every metric's name (a constant: dashboards depend on it)

_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# a precision in a weight file's name (`..._bf16.safetensors`, `..._fp8_e4m3fn_scaled_KJ...`)
_DTYPE = re.compile(
    r"(?<![a-z0-9])(fp8_e4m3fn_scaled|fp8_e4m3fn|fp8_e5m2|fp8_scaled|fp8|nvfp4|fp4|int8|int4"
    r"|bf16|fp16|fp32)(?![a-z0-9])",
    re.IGNORECASE,
)


class PrefixedRegistry(CollectorRegistry):
    """A registry whose metrics are read with `PREFIX` before their names."""

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            yield family if family.name.startswith(PREFIX) else _prefixed(family)


def _prefixed(family: Metric) -> Metric:
    renamed = Metric(PREFIX + family.name, family.documentation, family.type, family.unit)
    renamed.samples = [s._replace(name=PREFIX + s.name) for s in family.samples]
    return renamed


def weights_facts(
    manifest: Path | None, graphs: Iterable[Mapping[str, Any]] = ()
) -> dict[str, str]:
    """`model` and `precision` of a ComfyUI service, from its model manifest: the
    manifest's name, and the precision its diffusion models' file names state (or the
    `weight_dtype` its workflows' loaders set, when not "default")."""
    if manifest is None:
        return {}
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = [f for f in data.get("files", []) if f.get("folder") == "diffusion_models"]
    except (OSError, ValueError, AttributeError):
        return {}
    cast = {
        str(node["inputs"]["weight_dtype"])
        for graph in graphs
        for node in graph.values()
        if isinstance(node, Mapping)
        and isinstance(node.get("inputs"), Mapping)
        and node["inputs"].get("weight_dtype", "default") != "default"
    }
    named = {m.group(1).lower() for f in files if (m := _DTYPE.search(str(f.get("name", ""))))}
    return {"model": str(data.get("service") or ""), "precision": "+".join(sorted(cast or named))}


def model_labels(engine_info: Mapping[str, Any], fallback: Mapping[str, str]) -> dict[str, str]:
    """The info metric's `model` and `precision` from what `/v1/service` reports as
    `model` (the engine's facts: a predictor's `variant`/`model`, `precision` or
    `transformer_kind`), else `fallback` (`weights_facts`); empty while unknown."""
    model = engine_info.get("variant") or engine_info.get("model") or fallback.get("model")
    precision = (
        engine_info.get("precision")
        or engine_info.get("transformer_kind")
        or fallback.get("precision")
    )
    return {"model": str(model or ""), "precision": str(precision or "")}


class _Info(Collector):
    def __init__(self, service: str) -> None:
        self.service = service
        self.version = ""
        self.model: Callable[[], Mapping[str, str]] = dict

    def collect(self) -> Iterable[GaugeMetricFamily]:
        model = self.model()
        info = GaugeMetricFamily(
            "info",
            "Always 1: the service, its version, its model and the model's precision",
            labels=["service", "version", "model", "precision"],
        )
        info.add_metric(
            [self.service, self.version, model.get("model", ""), model.get("precision", "")], 1
        )
        yield info


class _GpuMemory(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily]:
        used = GaugeMetricFamily("gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        for info in gpu.probe():
            used.add_metric([str(info.index)], info.total_bytes - info.free_bytes)
            total.add_metric([str(info.index)], info.total_bytes)
        yield used
        yield total


class Metrics:
    def __init__(
        self,
        service: str,
        queue_depth: Callable[[], float],
        oldest_queued_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.registry: CollectorRegistry = PrefixedRegistry()
        self.jobs = Counter(
            "jobs_total",
            "Jobs that ended, by status and error code",
            ["status", "error_code"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "jobs_queued", "Jobs waiting for the worker", registry=self.registry
        )
        self.queue_depth.set_function(queue_depth)
        self.oldest_queued = Gauge(
            "jobs_queued_oldest_seconds",
            "How long the oldest job ready to start has waited (the fleet's, with QUEUE_URL)",
            registry=self.registry,
        )
        self.oldest_queued.set_function(oldest_queued_s)
        self.reclaims = Counter(
            "fleet_reclaims_total",
            "Jobs this pod's sweep took back from pods that stopped beating: queued again, "
            "or failed as poison",
            ["outcome"],
            registry=self.registry,
        )
        self.running = Gauge("jobs_running", "Jobs running now", registry=self.registry)
        self.queue_wait = Histogram(
            "job_queue_wait_seconds",
            "Time from submit to start",
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "job_run_seconds",
            "Time from start to end",
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "HTTP latency by route",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.engine_busy = Counter(
            "engine_busy_seconds_total",
            "Seconds the engine (GPU) spent running jobs; rate() of it is the busy ratio",
            registry=self.registry,
        )
        self.job_gap = Histogram(
            "job_gap_seconds",
            "Idle time of the engine between one job's end and the next one's start, when "
            "the next job was already waiting",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "worker_restarts_total",
            "Worker processes started again after dying",
            ["reason"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "webhook_attempts_total",
            "Webhook delivery attempts by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.task_up = Gauge(
            "background_task_up",
            "1 while a background task (job-runner, webhooks, retention, fleet-sweep, "
            "fleet-events) works, 0 while its steps fail (it retries by itself)",
            ["task"],
            registry=self.registry,
        )
        self.task_failures = Counter(
            "background_task_failures_total",
            "Failed steps of background tasks, by error code",
            ["task", "error_code"],
            registry=self.registry,
        )
        self._info = _Info(service)
        self.registry.register(self._info)
        self.registry.register(_GpuMemory())

    def describe(self, version: str, model: Callable[[], Mapping[str, str]]) -> None:
        """The info metric's `version`, and `model` and `precision` as `model()` reads
        them at each scrape (a model loaded later changes them)."""
        self._info.version = version
        self._info.model = model

    def model_facts(self) -> dict[str, str]:
        """The info metric's `model` and `precision` now (those known)."""
        return {key: value for key, value in self._info.model().items() if value}

    def job_started(self, created_at: float, started_at: float) -> None:
        """The engine began a job created at `created_at` (epoch seconds)."""
        self.running.inc()
        self.queue_wait.observe(max(0.0, started_at - created_at))

    def job_ended(self, job: Job, was_running: bool) -> None:
        if was_running:
            self.running.dec()
            if job.started_at is not None and job.finished_at is not None:
                self.run_time.observe(max(0.0, job.finished_at - job.started_at))
        code = (job.error or {}).get("code", "") if job.status is JobStatus.FAILED else ""
        self.jobs.labels(job.status.value, code).inc()
