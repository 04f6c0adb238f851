"""The change feed: a job store tells of every write of a job it committed.

Each store (`SqliteJobStore`, `RedisJobStore`) owns one `ChangeFeed` (`store.changes`)
and publishes to it after each committed write of a job: `create` (a new job only: an
idempotent repeat wrote nothing), `create_graph` (the parent: its parts are new and
queued, and nobody can listen to them yet), `add_children` and `remove_child` (the
parent), `update`, `transition` and `claim_next`. The change is the `Job` object the
write saved (no read, no copy) and what the write did to it (`ChangeKind`), found by
comparing the record before and after. A deletion (`prune_finished`, a removed part)
publishes nothing: there is no job after it, and nobody follows a job that old.

Who listens (each for the kinds it needs; wired in `model_service.api.app`):

- the event bus (`EventBus.follow`): STATUS and CANCEL as `status` events (server-sent
  events, `Prefer: wait`, a fleet's pods through Redis pub/sub, a cancel to the pod that
  runs the job);
- the webhooks (`WebhookDispatcher`): STATUS, when the job is not queued;
- the graph coordinator (`JobGraphs`, while started): STATUS of a long video's part.

Progress is not published from here: the runner publishes every step of a job to the
bus as it comes, without a write, and saves the latest at most once a second; the
graph coordinator publishes a long video's summed progress. Both call
`JobRunner.publish_progress` (the explicit progress path).

Threads: listeners are called synchronously after the commit, on the caller's thread,
in commit order, once per write: the store is used on the event loop. A write from
another thread (retention's `update` of `outputs_expired`, in `asyncio.to_thread`)
hands its change to the loop the feed is bound to (`bind`, at start-up) with
`call_soon_threadsafe`, so listeners always run on the loop; a kind no listener wants
costs nothing. A feed bound to no loop calls listeners on the caller's thread (tests,
tools). A listener's exception reaches the writer, after the commit (as the writer's
own call after the write used to).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus


class ChangeKind(StrEnum):
    STATUS = "status"  # a new job; its status moved; or a new attempt began (a claim)
    CANCEL = "cancel"  # a cancel was requested; the status is as it was
    PROGRESS = "progress"  # the saved progress changed, nothing above
    OTHER = "other"  # anything else: its start time, outputs expired, a long video's plan


@dataclass(frozen=True, slots=True)
class JobChange:
    job: Job  # the record as the write saved it (shared: listeners must not change it)
    kind: ChangeKind


ChangeListener = Callable[[JobChange], None]
# what decides a change's kind, read from the record before the write
Before = tuple[JobStatus, int, bool, int, int]


def before(job: Job) -> Before:
    """What `kind_of` compares (read before the write's `change` runs)."""
    return (
        job.status,
        job.attempts,
        job.cancel_requested,
        job.progress_step,
        job.progress_total,
    )


def kind_of(was: Before, job: Job) -> ChangeKind:
    """What a write did to `job` (`was`: `before(job)` ahead of it). A new job is a
    STATUS change (its writer says so)."""
    status, attempts, cancel_requested, step, total = was
    if job.status is not status or job.attempts > attempts:
        return ChangeKind.STATUS
    if job.cancel_requested and not cancel_requested:
        return ChangeKind.CANCEL
    if (job.progress_step, job.progress_total) != (step, total):
        return ChangeKind.PROGRESS
    return ChangeKind.OTHER


class ChangeFeed:
    """The listeners of one store's writes, by the kinds of change each wants."""

    def __init__(self) -> None:
        self._listeners: dict[ChangeKind, list[ChangeListener]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listeners run on `loop` (the thread that calls this runs it): changes written
        by other threads are handed to it."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def subscribe(self, listener: ChangeListener, *kinds: ChangeKind) -> Callable[[], None]:
        """`listener` hears of every change of `kinds` (every kind if none is named) from
        now on, after the listeners subscribed before it. Returns its unsubscribe."""
        chosen = kinds or tuple(ChangeKind)
        for kind in chosen:
            self._listeners[kind] = [*self._listeners.get(kind, ()), listener]

        def unsubscribe() -> None:
            for kind in chosen:
                listeners = [item for item in self._listeners.get(kind, ()) if item != listener]
                self._listeners[kind] = listeners

        return unsubscribe

    def publish(self, job: Job, kind: ChangeKind) -> None:
        """Called by the store after each committed write of `job`."""
        listeners = self._listeners.get(kind)
        if not listeners:
            return
        change = JobChange(job, kind)
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            if not loop.is_closed():  # at shutdown there is nobody left to tell
                loop.call_soon_threadsafe(_deliver, listeners, change)
            return
        _deliver(listeners, change)


def _deliver(listeners: list[ChangeListener], change: JobChange) -> None:
    for listener in listeners:  # a list replaced, never changed, by (un)subscribe
        listener(change)
