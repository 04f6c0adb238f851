"""Prometheus metrics of one service process (one registry per app)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from model_service import gpu
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus

_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


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
        self.registry = CollectorRegistry()
        labels = {"service": service}
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
        Gauge("service_info", "Service name", list(labels), registry=self.registry).labels(
            **labels
        ).set(1)
        self.registry.register(_GpuMemory())

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
