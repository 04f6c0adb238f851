"""The change feed (`model_service.jobs.feed`): both stores publish each committed write of
a job once, after the commit, as the job object the write saved, with what it changed;
an idempotent repeat and a deletion publish nothing; a write from another thread reaches
the listeners on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_service.jobs.feed import ChangeKind, JobChange
from model_service.jobs.record import Job, JobKind
from model_service.jobs.redis_store import RedisJobStore
from model_service.jobs.status import JobStatus
from model_service.jobs.store import JobStore, SqliteJobStore
from model_service_testing.process import RedisServer


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    made: JobStore
    if request.param == "sqlite":
        made = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        made = RedisJobStore(server.url, "ms:feed")
    yield made
    made.close()


def new_job(job_id: str, request_hash: str = "h") -> Job:
    return Job(job_id, JobStatus.QUEUED, {"x": 1}, {"x": 1}, 7, request_hash)


def heard(store: JobStore, *kinds: ChangeKind) -> list[JobChange]:
    changes: list[JobChange] = []
    store.changes.subscribe(changes.append, *kinds)
    return changes


def test_each_write_publishes_the_job_it_saved_and_what_changed(store: JobStore) -> None:
    changes = heard(store)
    job, created = store.create(new_job("a"))
    assert created
    assert changes == [JobChange(job, ChangeKind.STATUS)]
    assert changes[-1].job is job  # the write's own object: no read, no copy
    store.create(new_job("a"))  # an idempotent repeat wrote nothing
    assert len(changes) == 1

    def progress(record: Job) -> None:
        record.progress_step, record.progress_total = 1, 4

    saved = store.update("a", progress)
    assert changes[-1].job is saved
    saved_info = store.update("a", lambda record: setattr(record, "info", {"k": 1}))
    claimed = store.claim_next()
    assert claimed is not None
    assert claimed.started_at is None
    canceling = store.update("a", lambda record: setattr(record, "cancel_requested", True))
    ended = store.transition("a", JobStatus.CANCELED)
    assert changes[1:] == [
        JobChange(saved, ChangeKind.PROGRESS),
        JobChange(saved_info, ChangeKind.OTHER),
        JobChange(claimed, ChangeKind.STATUS),
        JobChange(canceling, ChangeKind.CANCEL),
        JobChange(ended, ChangeKind.STATUS),
    ]


def test_a_claim_that_starts_now_records_the_start(store: JobStore) -> None:
    store.create(new_job("a"))
    changes = heard(store, ChangeKind.STATUS)
    before = time.time()
    claimed = store.claim_next(starts_now=True)
    assert claimed is not None
    assert claimed.attempts == 1
    assert claimed.started_at is not None
    assert claimed.started_at >= before
    assert store.get("a").started_at == claimed.started_at
    assert changes == [JobChange(claimed, ChangeKind.STATUS)]


def test_graph_writes_publish_the_parent_and_deletions_nothing(store: JobStore) -> None:
    changes = heard(store)
    parent = new_job("p")
    parent.kind, parent.children = JobKind.CHAIN, ["p.0"]
    child = new_job("p.0")
    child.parent_id = "p"
    stored, created = store.create_graph(parent, [child])
    assert created
    assert changes == [JobChange(stored, ChangeKind.STATUS)]  # not its new parts
    store.create_graph(parent, [child])  # a repeat
    assert len(changes) == 1
    more = new_job("p.1")
    more.parent_id = "p"

    def add(record: Job) -> None:
        record.children = [*record.children, "p.1"]

    grown = store.add_children("p", [more], add)
    assert changes[-1] == JobChange(grown, ChangeKind.OTHER)

    def drop(record: Job) -> None:
        record.children = record.children[:-1]

    shrunk = store.remove_child("p", "p.1", drop)
    assert changes[-1] == JobChange(shrunk, ChangeKind.OTHER)
    for job_id in ("p.0", "p"):
        store.transition(job_id, JobStatus.CANCELED, lambda record: _finished(record, 1.0))
    count = len(changes)
    assert store.prune_finished(cutoff=2.0) != []
    assert len(changes) == count


def _finished(record: Job, at: float) -> None:
    record.finished_at = at


def test_listeners_hear_only_their_kinds_until_they_unsubscribe(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    status: list[JobChange] = []
    unsubscribe = store.changes.subscribe(status.append, ChangeKind.STATUS)
    store.create(new_job("a"))
    store.update("a", lambda record: setattr(record, "progress_step", 3))
    assert [change.kind for change in status] == [ChangeKind.STATUS]
    unsubscribe()
    store.transition("a", JobStatus.CANCELED)
    assert len(status) == 1
    store.close()


def test_a_write_from_another_thread_is_heard_on_the_event_loop(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(new_job("a"))
    threads: list[int] = []
    store.changes.subscribe(lambda change: threads.append(threading.get_ident()))

    async def scenario() -> int:
        store.changes.bind(asyncio.get_running_loop())
        # as retention's pass (asyncio.to_thread): the listener must not run there
        await asyncio.to_thread(store.update, "a", lambda record: setattr(record, "seed", 8))
        await asyncio.sleep(0)  # the loop runs what the thread handed over
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert threads == [loop_thread]
    store.close()
