"""Everything a request handler needs, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from model_service.fetch import SafeHttpClient
from model_service.jobs.events import EventBus
from model_service.jobs.graph import JobGraphs
from model_service.jobs.record import Job
from model_service.jobs.store import JobStore
from model_service.metrics import Metrics
from model_service.runner import JobRunner
from model_service.service import ServiceSpec
from model_service.settings import Settings
from model_service.submit import JobSubmitter
from model_service.webhooks import WebhookDispatcher


@dataclass
class ServiceState:
    spec: ServiceSpec
    settings: Settings
    store: JobStore
    bus: EventBus
    metrics: Metrics
    http: SafeHttpClient
    webhooks: WebhookDispatcher
    runner: JobRunner
    submitter: JobSubmitter
    graphs: JobGraphs | None = None  # services with long videos
    pod_url: str | None = None  # a fleet: this pod's own URL (outputs of its jobs)

    def base_url(self, request: Request) -> str:
        return self.settings.public_url or str(request.base_url)

    def children(self, job: Job) -> list[Job] | None:
        """A long video's parts (None for a plain job)."""
        return self.store.children(job.id) if job.is_parent else None


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state
