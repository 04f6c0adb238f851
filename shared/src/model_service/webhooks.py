"""Webhook deliveries: Standard Webhooks signatures, kept in the job store, retried.

A delivery is written to the store before anything is sent, so a restart does not
drop it. The dispatcher sends what is due; a failure is retried with exponential
backoff and jitter up to `webhook_max_attempts`; a 410 Gone stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from model_service.errors import ServiceError, StoreUnavailable
from model_service.fetch import SafeHttpClient
from model_service.jobs.record import Job
from model_service.jobs.store import Delivery, JobStore
from model_service.jobs.view import job_view
from model_service.logs import get_logger
from model_service.metrics import Metrics
from model_service.settings import Settings

log = get_logger("model_service.webhooks")

# Events a caller can subscribe to with `webhook_events`; default: the terminal ones.
WEBHOOK_EVENTS = ("running", "awaiting_input", "succeeded", "failed", "canceled")
DEFAULT_WEBHOOK_EVENTS = ("succeeded", "failed", "canceled")


class WebhookDispatcher:
    def __init__(
        self, settings: Settings, store: JobStore, http: SafeHttpClient, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._store = store
        self._http = http
        self._metrics = metrics
        secret = settings.webhook_secret
        self._signer = Webhook(secret.get_secret_value()) if secret else None
        self._wake = asyncio.Event()

    def enqueue(self, job: Job, event: str) -> None:
        """Store a delivery for `job` if it asked for `event`."""
        if job.webhook is None or event not in job.webhook_events:
            return
        children = self._store.children(job.id) if job.is_parent else None  # a long video's parts
        body = {
            "type": f"job.{event}",
            "timestamp": datetime.now(tz=UTC).isoformat(),
            "data": job_view(job, job.base_url, children).model_dump(mode="json"),
        }
        delivery = Delivery(
            id=f"msg_{uuid.uuid4().hex}",
            job_id=job.id,
            url=job.webhook,
            event_type=f"job.{event}",
            payload=json.dumps(body),
            attempts=0,
        )
        self._store.add_delivery(delivery, due_at=time.time())
        self._wake.set()

    async def run(self) -> None:
        """Send due deliveries until canceled."""
        while True:
            try:
                for delivery in self._store.due_deliveries(time.time()):
                    await self._attempt(delivery)
                due = self._store.next_delivery_due()
                delay = 60.0 if due is None else max(0.0, due - time.time())
            except StoreUnavailable as exc:  # a fleet's Redis is down: try again soon
                log.warning("webhook deliveries not readable", error=exc.message)
                delay = 2.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 60.0))

    async def _attempt(self, delivery: Delivery) -> None:
        attempt = delivery.attempts + 1
        headers = {"content-type": "application/json", "user-agent": "model-service-webhooks"}
        if self._signer is not None:
            now = datetime.now(tz=UTC)
            headers.update(
                {
                    "webhook-id": delivery.id,
                    "webhook-timestamp": str(int(now.timestamp())),
                    "webhook-signature": self._signer.sign(delivery.id, now, delivery.payload),
                }
            )
        else:
            headers["webhook-id"] = delivery.id
        error: str | None
        try:
            response = await self._http.post(
                delivery.url,
                content=delivery.payload.encode(),
                headers=headers,
                timeout_s=self._settings.webhook_timeout_s,
            )
            error = None if response.is_success else f"receiver answered {response.status_code}"
            gone = response.status_code == 410
        except ServiceError as exc:
            error, gone = exc.message, False
        if error is None:
            self._store.record_attempt(
                delivery.id, state="delivered", next_attempt_at=0, error=None
            )
            self._metrics.webhooks.labels("delivered").inc()
            log.info("webhook delivered", job_id=delivery.job_id, type=delivery.event_type)
            return
        if gone or attempt >= self._settings.webhook_max_attempts:
            self._store.record_attempt(delivery.id, state="failed", next_attempt_at=0, error=error)
            self._metrics.webhooks.labels("gave_up").inc()
            log.warning("webhook given up", job_id=delivery.job_id, attempts=attempt, error=error)
            return
        delay = self._settings.webhook_retry_base_s * 2 ** (attempt - 1)
        delay *= random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
        self._store.record_attempt(
            delivery.id, state="pending", next_attempt_at=time.time() + delay, error=error
        )
        self._metrics.webhooks.labels("retry").inc()
        log.info(
            "webhook failed; will retry",
            job_id=delivery.job_id,
            attempt=attempt,
            retry_in_s=round(delay, 2),
            error=error,
        )
