"""Webhook deliveries: Standard Webhooks signatures, kept in the job store, retried.

A delivery is written to the store before anything is sent, so a restart does not
drop it (one that comes while the store cannot be written waits in memory until it
can). The dispatcher sends what is due, several at once but at most `PER_RECEIVER` to
one receiver, so a slow receiver delays only its own; a failure is retried with
exponential backoff and jitter up to `webhook_max_attempts`; a 410 Gone stops at once.
Deliveries come from the store's change feed: each status change of a job that is not
queued, for the events the job asked for (`model_service.jobs.feed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from model_service.background import BACKOFF_S, describe, error_code
from model_service.errors import ServiceError, StoreUnavailable
from model_service.fetch import SafeHttpClient
from model_service.jobs.feed import ChangeKind, JobChange
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.jobs.store import Delivery, DeliveryStore
from model_service.jobs.view import job_view
from model_service.logs import get_logger
from model_service.metrics import Metrics
from model_service.settings import Settings

log = get_logger("model_service.webhooks")

# Events a caller can subscribe to with `webhook_events`; default: the terminal ones.
WEBHOOK_EVENTS = ("running", "awaiting_input", "succeeded", "failed", "canceled")
DEFAULT_WEBHOOK_EVENTS = ("succeeded", "failed", "canceled")

PER_RECEIVER = 4  # attempts in flight to one receiver (scheme, host and port)
IN_FLIGHT = 64  # attempts in flight in all
_DUE_READ = 200  # due deliveries read per pass (those of busy receivers are skipped)


class WebhookDispatcher:
    def __init__(
        self, settings: Settings, store: DeliveryStore, http: SafeHttpClient, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._store = store
        self._http = http
        self._metrics = metrics
        secret = settings.webhook_secret
        self._signer = Webhook(secret.get_secret_value()) if secret else None
        self._wake = asyncio.Event()
        self._sending: dict[str, asyncio.Task[None]] = {}  # delivery id -> its attempt
        self._per_receiver: Counter[str] = Counter()
        self._unsaved: list[tuple[Job, str]] = []  # came while the store was away
        store.changes.subscribe(self._status_changed, ChangeKind.STATUS)

    def _status_changed(self, change: JobChange) -> None:
        if change.job.status is not JobStatus.QUEUED:
            self.enqueue(change.job, change.job.status.value)

    def enqueue(self, job: Job, event: str) -> None:
        """Store a delivery for `job` if it asked for `event` (kept in memory while the
        store cannot be written; `step` stores it later)."""
        if job.webhook is None or event not in job.webhook_events:
            return
        try:
            self._store_delivery(job, event)
        except StoreUnavailable as exc:
            log.warning("webhook delivery not stored yet", job_id=job.id, error=exc.message)
            self._unsaved.append((job, event))
        self._wake.set()

    def _store_delivery(self, job: Job, event: str) -> None:
        assert job.webhook is not None
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

    async def step(self) -> None:
        """One pass of the sender's background task: store the deliveries kept in memory,
        start every due one whose receiver has room, then wait until one is due, comes
        or ends."""
        self._wake.clear()
        while self._unsaved:
            self._store_delivery(*self._unsaved[0])
            self._unsaved.pop(0)
        now = time.time()
        for delivery in self._store.due_deliveries(now, limit=_DUE_READ):
            receiver = _receiver(delivery.url)
            if (
                delivery.id not in self._sending
                and len(self._sending) < IN_FLIGHT
                and self._per_receiver[receiver] < PER_RECEIVER
            ):
                self._send(delivery, receiver)
        due = self._store.next_delivery_due()
        # one due now is in flight or waits for its receiver: an end wakes us, or we look
        # again in a second (a later delivery may be due before 60 s)
        delay = 60.0 if due is None else 1.0 if due <= now else due - now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 60.0))

    async def stop(self) -> None:
        """Stop the attempts in flight (they stay pending: sent again after a restart)."""
        tasks = list(self._sending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _send(self, delivery: Delivery, receiver: str) -> None:
        self._per_receiver[receiver] += 1
        task = asyncio.create_task(self._attempt(delivery), name="webhook")
        self._sending[delivery.id] = task

        def ended(task: asyncio.Task[None]) -> None:
            del self._sending[delivery.id]
            self._per_receiver[receiver] -= 1
            if self._per_receiver[receiver] <= 0:
                del self._per_receiver[receiver]
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error(  # pending still: it is sent again
                    "webhook attempt failed",
                    job_id=delivery.job_id,
                    error_code=error_code(exc),
                    error=describe(exc),
                )
            self._wake.set()  # its receiver has room again

        task.add_done_callback(ended)

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
            await self._record(delivery.id, state="delivered", next_attempt_at=0, error=None)
            self._metrics.webhooks.labels("delivered").inc()
            log.debug("webhook delivered", job_id=delivery.job_id, type=delivery.event_type)
            return
        if gone or attempt >= self._settings.webhook_max_attempts:
            await self._record(delivery.id, state="failed", next_attempt_at=0, error=error)
            self._metrics.webhooks.labels("gave_up").inc()
            log.warning("webhook given up", job_id=delivery.job_id, attempts=attempt, error=error)
            return
        delay = self._settings.webhook_retry_base_s * 2 ** (attempt - 1)
        delay *= random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
        await self._record(
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

    async def _record(
        self, delivery_id: str, *, state: str, next_attempt_at: float, error: str | None
    ) -> None:
        """The attempt's outcome, written once the store can be (meanwhile the delivery
        stays in flight, so it is not sent again)."""
        failures = 0
        while True:
            try:
                self._store.record_attempt(
                    delivery_id, state=state, next_attempt_at=next_attempt_at, error=error
                )
                return
            except StoreUnavailable as exc:
                if failures == 0:
                    log.warning("webhook attempt not recorded yet", error=exc.message)
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1


def _receiver(url: str) -> str:
    """Whom a delivery goes to: its URL's scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()
