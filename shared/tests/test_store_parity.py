"""The SQLite and the Redis job stores behave the same; the Redis one across processes."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from model_service.errors import (
    IdempotencyConflict,
    InvalidTransition,
    NotFound,
    StoreUnavailable,
)
from model_service.jobs.record import Job
from model_service.jobs.redis_store import RedisJobStore
from model_service.jobs.status import TERMINAL, JobStatus
from model_service.jobs.store import Delivery, JobStore, SqliteJobStore, Upload
from model_service.retention import sweep
from model_service.settings import Settings
from model_service_testing.process import RedisServer

Store = JobStore

NAMESPACE = "ms:parity"


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    if request.param == "sqlite":
        made = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        made = RedisJobStore(server.url, NAMESPACE)
        made._ensure_indexes()  # as the first retention pass: the writes then keep them
    yield made
    made.close()


def new_job(job_id: str, request_hash: str = "h") -> Job:
    return Job(job_id, JobStatus.QUEUED, {"x": 1}, {"x": 1}, 7, request_hash)


def part(job_id: str, parent: str, depends_on: list[str] | None = None) -> Job:
    job = new_job(job_id)
    job.parent_id, job.depends_on = parent, depends_on or []
    return job


def parent_job(job_id: str, children: list[str] | None = None) -> Job:
    job = new_job(job_id)
    job.kind, job.children = "chain", children or []
    return job


def ids(jobs: list[Job]) -> list[str]:
    return [job.id for job in jobs]


def claim_id(store: Store) -> str | None:
    job = store.claim_next()
    return None if job is None else job.id


def set_field(name: str, value: object) -> Callable[[Job], None]:
    return lambda job: setattr(job, name, value)


# --- both stores -----------------------------------------------------------------------


def test_create_is_idempotent_conflicts_and_missing_is_not_found(store: Store) -> None:
    job = new_job("a")
    job.info = {"float": 1 / 3, "nested": {"list": [1, "two", None]}}
    created, new = store.create(job)
    assert (created.id, new) == ("a", True)
    again, new = store.create(new_job("a"))
    assert new is False
    assert again.info == job.info  # the stored job, not the one passed again
    assert store.get("a") == job  # every field round-trips exactly
    with pytest.raises(IdempotencyConflict) as conflict:
        store.create(new_job("a", request_hash="other"))
    assert conflict.value.details == {"job_id": "a"}
    assert store.find("missing") is None
    with pytest.raises(NotFound):
        store.get("missing")
    with pytest.raises(NotFound):
        store.update("missing", set_field("seed", 1))
    with pytest.raises(NotFound):
        store.transition("missing", JobStatus.RUNNING)


def test_transitions_allowed_and_refused(store: Store) -> None:
    store.create(new_job("a"))
    with pytest.raises(InvalidTransition):
        store.transition("a", JobStatus.SUCCEEDED)  # queued jobs must run first
    assert store.get("a").status is JobStatus.QUEUED
    running = store.transition("a", JobStatus.RUNNING, set_field("progress_total", 9))
    assert (running.status, running.progress_total) == (JobStatus.RUNNING, 9)
    done = store.transition("a", JobStatus.SUCCEEDED, set_field("outputs", ["o.png"]))
    assert store.get("a") == done
    assert done.outputs == ["o.png"]
    for target in set(JobStatus) - {JobStatus.AWAITING_INPUT}:
        with pytest.raises(InvalidTransition):
            store.transition("a", target)
    assert store.transition("a", JobStatus.AWAITING_INPUT).status is JobStatus.AWAITING_INPUT
    assert store.transition("a", JobStatus.FAILED, durable=False).status is JobStatus.FAILED
    assert store.transition("a", JobStatus.QUEUED).status is JobStatus.QUEUED  # a retry


def test_a_change_that_raises_saves_nothing(store: Store) -> None:
    store.create(new_job("a"))

    def fail(job: Job) -> None:
        job.seed = 99
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.update("a", fail)
    with pytest.raises(RuntimeError):
        store.transition("a", JobStatus.CANCELED, fail)
    assert store.get("a").seed == 7
    assert store.get("a").status is JobStatus.QUEUED
    assert store.count(JobStatus.QUEUED) == 1


def test_update_saves_changes_and_a_status_it_sets(store: Store) -> None:
    store.create(new_job("a"))
    updated = store.update("a", set_field("progress_step", 3), durable=False)
    assert store.get("a").progress_step == updated.progress_step == 3
    store.update("a", set_field("status", JobStatus.RUNNING))  # callers check first
    assert store.count(JobStatus.QUEUED) == 0
    assert store.count(JobStatus.RUNNING) == 1
    assert ids(store.running()) == ["a"]
    assert ids(store.page(JobStatus.RUNNING, 10, None).jobs) == ["a"]
    assert store.page(JobStatus.QUEUED, 10, None).jobs == []
    assert store.claim_next() is None


def test_claim_is_fifo_and_counts_the_attempt(store: Store) -> None:
    for job_id in ["first", "second", "third"]:
        store.create(new_job(job_id))
    store.update("second", set_field("progress_step", 5))
    claimed = store.claim_next()
    assert claimed is not None
    assert (claimed.id, claimed.status, claimed.attempts) == ("first", JobStatus.RUNNING, 1)
    assert claimed.started_at is None  # set when the engine begins it (it may wait first)
    assert store.get("first") == claimed
    second = store.claim_next()
    assert second is not None
    assert (second.id, second.progress_step) == ("second", 0)
    assert [claim_id(store), claim_id(store)] == ["third", None]
    store.transition("first", JobStatus.QUEUED)  # the restart path: queued again
    again = store.claim_next()
    assert again is not None
    assert (again.id, again.attempts) == ("first", 2)


def test_claims_follow_dependencies_and_skip_parents(store: Store) -> None:
    children = [part("p.0", "p"), part("p.1", "p", ["p.0"]), part("p.2", "p", ["p.1"])]
    assert store.create_graph(parent_job("p"), children)[1] is True
    store.create(new_job("other"))
    assert ids(store.runnable()) == ["p.0", "other"]
    assert claim_id(store) == "p.0"
    assert ids(store.runnable()) == ["other"]
    assert claim_id(store) == "other"
    assert store.runnable() == []
    assert store.claim_next() is None  # p.1 waits for p.0; the parent is never claimed
    store.transition("p.0", JobStatus.FAILED)
    assert store.claim_next() is None  # a failed dependency never releases p.1
    assert store.runnable() == []
    store.transition("p.0", JobStatus.QUEUED)  # retry
    assert claim_id(store) == "p.0"
    store.transition("p.0", JobStatus.SUCCEEDED)
    assert ids(store.runnable()) == ["p.1"]
    assert claim_id(store) == "p.1"
    store.transition("p", JobStatus.RUNNING)  # as the coordinator keeps it
    assert ids(store.running()) == ["p.1", "other"]  # never the parent
    assert store.get("p").status is JobStatus.RUNNING
    assert store.claim_next() is None


def test_runnable_lists_in_claim_order_without_claiming(store: Store) -> None:
    store.create(new_job("a"))
    store.create_graph(parent_job("g"), [part("g.0", "g"), part("g.1", "g", ["g.0"])])
    store.create(new_job("b"))
    store.create(new_job("waits"))
    store.update("waits", set_field("status", JobStatus.RUNNING))
    assert ids(store.runnable()) == ["a", "g.0", "b"]
    assert ids(store.runnable(limit=2)) == ["a", "g.0"]
    assert store.count(JobStatus.QUEUED) == 4  # nothing was claimed
    assert [claim_id(store) for _ in range(4)] == ["a", "g.0", "b", None]


def test_a_dependency_that_is_not_stored_holds_nothing_back(store: Store) -> None:
    store.create(part("lone", "nobody", ["never-created"]))
    assert ids(store.runnable()) == ["lone"]
    assert ids(store.children("nobody")) == ["lone"]


def test_graph_children_added_and_removed_atomically(store: Store) -> None:
    store.create_graph(parent_job("p", ["p.0"]), [part("p.0", "p")])
    assert store.create_graph(parent_job("p", ["p.0"]), [part("p.0", "p")])[1] is False
    other = parent_job("p")
    other.request_hash = "other"
    with pytest.raises(IdempotencyConflict):
        store.create_graph(other, [])
    parent = store.add_children(
        "p",
        [part("p.1", "p", ["p.0"]), part("p.2", "p", ["p.1"])],
        lambda job: job.children.extend(["p.1", "p.2"]),
    )
    assert parent.children == store.get("p").children == ["p.0", "p.1", "p.2"]
    assert ids(store.children("p")) == ["p.0", "p.1", "p.2"]
    assert store.get("p.2").depends_on == ["p.1"]
    with pytest.raises(NotFound):
        store.add_children("missing", [part("m.0", "missing")], lambda job: None)
    assert store.find("m.0") is None
    claim_id(store)
    store.transition("p.0", JobStatus.SUCCEEDED)
    store.update("p.1", set_field("status", JobStatus.RUNNING))  # p.2 waits for it
    assert store.runnable() == []
    parent = store.remove_child("p", "p.1", lambda job: job.children.remove("p.1"))
    assert parent.children == store.get("p").children == ["p.0", "p.2"]
    assert store.find("p.1") is None
    assert ids(store.children("p")) == ["p.0", "p.2"]
    assert store.running() == []
    assert store.count(JobStatus.RUNNING) == 0
    assert ids(store.page(None, 10, None).jobs) == ["p.2", "p.0", "p"]
    assert ids(store.runnable()) == ["p.2"]  # its dependency went with p.1
    store.remove_child("p", "not-a-child", lambda job: None)  # nothing to delete
    assert ids(store.children("p")) == ["p.0", "p.2"]
    with pytest.raises(NotFound):
        store.remove_child("missing", "p.0", lambda job: None)


def test_open_parents_are_the_unfinished_ones(store: Store) -> None:
    store.create_graph(parent_job("p1"), [part("p1.0", "p1")])
    store.create_graph(parent_job("p2"), [part("p2.0", "p2")])
    store.create(new_job("plain"))
    assert ids(store.open_parents()) == ["p1", "p2"]
    store.transition("p1", JobStatus.RUNNING)
    store.transition("p1", JobStatus.SUCCEEDED)
    assert ids(store.open_parents()) == ["p2"]
    store.transition("p1", JobStatus.AWAITING_INPUT)  # reopened
    assert ids(store.open_parents()) == ["p1", "p2"]
    store.transition("p2", JobStatus.CANCELED)
    assert ids(store.open_parents()) == ["p1"]
    assert store.children("plain") == []


def test_page_is_newest_first_with_a_cursor_and_a_filter(store: Store) -> None:
    for n in range(7):
        store.create(new_job(f"j{n}"))
    store.create_graph(parent_job("p"), [part("p.0", "p")])  # parents are listed too
    for job_id in ["j1", "j4", "j5"]:
        store.transition(job_id, JobStatus.CANCELED)
    seen: list[str] = []
    cursor: int | None = None
    pages = 0
    while True:
        page = store.page(None, 3, cursor)
        seen += ids(page.jobs)
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ["p.0", "p", "j6", "j5", "j4", "j3", "j2", "j1", "j0"]
    assert pages == 3
    first = store.page(JobStatus.CANCELED, 2, None)
    assert ids(first.jobs) == ["j5", "j4"]
    assert isinstance(first.next_cursor, int)
    rest = store.page(JobStatus.CANCELED, 2, first.next_cursor)
    assert (ids(rest.jobs), rest.next_cursor) == (["j1"], None)
    exact = store.page(JobStatus.CANCELED, 3, None)  # exactly a page: no next
    assert (len(exact.jobs), exact.next_cursor) == (3, None)
    assert ids(store.page(JobStatus.QUEUED, 10, None).jobs) == ["p.0", "p", "j6", "j3", "j2", "j0"]
    assert store.page(JobStatus.FAILED, 10, None).jobs == []


def test_count_excludes_parents(store: Store) -> None:
    store.create_graph(parent_job("p"), [part("p.0", "p"), part("p.1", "p", ["p.0"])])
    store.create(new_job("a"))
    assert store.count(JobStatus.QUEUED) == 3
    store.transition("p", JobStatus.RUNNING)
    claim_id(store)
    assert store.count(JobStatus.RUNNING) == 1
    assert store.count(JobStatus.QUEUED) == 2
    assert store.count(JobStatus.SUCCEEDED) == 0


def test_finished_before_lists_old_terminal_jobs_with_outputs(store: Store) -> None:
    now = time.time()
    for job_id, status in [
        ("old-ok", JobStatus.SUCCEEDED),
        ("old-failed", JobStatus.FAILED),
        ("old-canceled", JobStatus.CANCELED),
        ("new-ok", JobStatus.SUCCEEDED),
        ("expired", JobStatus.SUCCEEDED),
        ("still-running", JobStatus.RUNNING),
    ]:
        store.create(new_job(job_id))
        store.transition(job_id, JobStatus.RUNNING)
        if status in TERMINAL:
            store.transition(job_id, status, set_field("finished_at", now - 7200))
    store.update("new-ok", set_field("finished_at", now))
    store.update("expired", set_field("outputs_expired", True))
    store.update("still-running", set_field("finished_at", now - 7200))
    old = store.finished_before(now - 3600)
    assert sorted(ids(old)) == ["old-canceled", "old-failed", "old-ok"]
    assert store.finished_before(now - 9000) == []


def test_webhook_deliveries(store: Store) -> None:
    now = time.time()

    def delivery(n: int, job_id: str = "a") -> Delivery:
        return Delivery(f"msg_{n}", job_id, "https://hook.test/", "job.succeeded", f"{{{n}}}", 0)

    assert store.next_delivery_due() is None
    assert store.due_deliveries(now) == []
    store.add_delivery(delivery(1), due_at=now - 10)
    store.add_delivery(delivery(1), due_at=now - 99)  # the same id: nothing changes
    store.add_delivery(delivery(2), due_at=now - 20)
    store.add_delivery(delivery(3), due_at=now + 60)
    store.add_delivery(delivery(4, job_id="b"), due_at=now - 5)
    assert store.next_delivery_due() == pytest.approx(now - 20)
    assert ids_of(store.due_deliveries(now, limit=2)) == ["msg_2", "msg_1"]
    store.record_attempt("msg_2", state="delivered", next_attempt_at=0, error=None)
    store.record_attempt("msg_1", state="pending", next_attempt_at=now + 30, error="503")
    due = store.due_deliveries(now)
    assert due == [delivery(4, job_id="b")]
    store.record_attempt("msg_4", state="failed", next_attempt_at=0, error="gone")
    assert store.due_deliveries(now) == []
    assert store.next_delivery_due() == pytest.approx(now + 30)
    retry = store.due_deliveries(now + 45)
    assert [(d.id, d.attempts) for d in retry] == [("msg_1", 1)]
    assert retry[0].payload == "{1}"
    assert retry[0].url == "https://hook.test/"
    store.record_attempt("msg_1", state="delivered", next_attempt_at=0, error=None)
    store.record_attempt("missing", state="failed", next_attempt_at=0, error="x")  # no-op
    assert store.next_delivery_due() == pytest.approx(now + 60)
    assert store.deliveries("a") == [
        {
            "id": "msg_1",
            "event_type": "job.succeeded",
            "attempts": 2,
            "state": "delivered",
            "last_error": None,
        },
        {
            "id": "msg_2",
            "event_type": "job.succeeded",
            "attempts": 1,
            "state": "delivered",
            "last_error": None,
        },
        {
            "id": "msg_3",
            "event_type": "job.succeeded",
            "attempts": 0,
            "state": "pending",
            "last_error": None,
        },
    ]
    assert store.deliveries("b") == [
        {
            "id": "msg_4",
            "event_type": "job.succeeded",
            "attempts": 1,
            "state": "failed",
            "last_error": "gone",
        }
    ]
    assert store.deliveries("none") == []


def ids_of(deliveries: list[Delivery]) -> list[str]:
    return [d.id for d in deliveries]


def test_uploads(store: Store) -> None:
    upload = Upload("up_1", "face.png", "image/png", 1234, 1_700_000_000.25)
    bare = Upload("up_2", "clip", None, 0, 1.0)
    store.add_upload(upload)
    store.add_upload(bare)
    assert store.get_upload("up_1") == upload
    assert store.get_upload("up_2") == bare
    assert store.get_upload("missing") is None


def finish(store: Store, job_id: str, at: float, status: JobStatus = JobStatus.SUCCEEDED) -> None:
    """A stored queued job run and ended at `at`."""
    store.transition(job_id, JobStatus.RUNNING)
    store.transition(job_id, status, set_field("finished_at", at))


def test_finished_before_pages_by_finish_then_id(store: Store) -> None:
    """Pages oldest first by (finished_at, id), ties broken by id, after the last one
    of the page before; expired, unfinished and retried jobs are not listed."""
    old = time.time() - 7200
    for index in range(7):
        store.create(new_job(f"job{index}"))
        finish(store, f"job{index}", old + index % 3)
    for job_id in ["expired", "retried", "running"]:
        store.create(new_job(job_id))
    finish(store, "expired", old)
    store.update("expired", set_field("outputs_expired", True))
    finish(store, "retried", old, JobStatus.FAILED)
    store.transition("retried", JobStatus.QUEUED, set_field("finished_at", None))
    store.transition("running", JobStatus.RUNNING, set_field("finished_at", old))
    pages, after = [], None
    while page := store.finished_before(time.time() - 3600, limit=3, after=after):
        pages.append(ids(page))
        after = (page[-1].finished_at or 0.0, page[-1].id)
    assert pages == [["job0", "job3", "job6"], ["job1", "job4", "job2"], ["job5"]]
    assert ids(store.finished_before(old + 1)) == ["job0", "job3", "job6"]  # strictly before


def test_prune_finished_deletes_old_graphs_whole(store: Store) -> None:
    """Old finished top-level jobs go with their parts, dependencies and deliveries; a
    part never goes alone, nor a graph with a part unfinished, nor an unfinished job."""
    now = time.time()
    old, cutoff = now - 3 * 86400, now - 86400
    for job_id in ["plain", "new", "running", "queued"]:
        store.create(new_job(job_id))
    finish(store, "plain", old, JobStatus.FAILED)
    finish(store, "new", now)
    store.transition("running", JobStatus.RUNNING, set_field("finished_at", old))
    store.update("queued", set_field("finished_at", old))
    # a long video whose parts all ended, one waiting for the other
    store.create_graph(
        parent_job("video", ["video.0", "video.1"]),
        [part("video.0", "video"), part("video.1", "video", ["video.0"])],
    )
    store.transition("video", JobStatus.RUNNING)
    for child in ["video.0", "video.1"]:
        finish(store, child, old)
    store.transition("video", JobStatus.SUCCEEDED, set_field("finished_at", old))
    # ended (canceled) but a part still runs; and an open one whose part ended long ago
    store.create_graph(parent_job("busy", ["busy.0"]), [part("busy.0", "busy")])
    store.transition("busy", JobStatus.CANCELED, set_field("finished_at", old))
    store.transition("busy.0", JobStatus.RUNNING)
    store.create_graph(parent_job("open", ["open.0"]), [part("open.0", "open")])
    store.transition("open", JobStatus.RUNNING)
    finish(store, "open.0", old)
    for n, job_id in enumerate(["plain", "video", "video.0", "new"]):
        store.add_delivery(Delivery(f"d{n}", job_id, "https://hook", "job.succeeded", "{}", 0), now)
        store.save_log(job_id, [f"a line of {job_id}"])
    store.update("video.0", set_field("held_by", "http://pod-a"))

    pruned = store.prune_finished(cutoff)
    assert sorted(pruned) == [
        ("plain", ""),
        ("video", ""),
        ("video.0", "http://pod-a"),
        ("video.1", ""),
    ]
    for job_id in ["plain", "video", "video.0", "video.1"]:
        assert store.find(job_id) is None
        assert store.deliveries(job_id) == []
        assert store.job_log(job_id) is None
    assert store.job_log("new") == ["a line of new"]
    kept = ["new", "running", "queued", "busy", "busy.0", "open", "open.0"]
    assert all(store.find(job_id) is not None for job_id in kept)
    assert sorted(ids(store.page(None, 100, None).jobs)) == sorted(kept)
    assert ids(store.children("open")) == ["open.0"]
    assert [d.id for d in store.due_deliveries(now + 1, limit=10)] == ["d3"]  # "new"'s
    assert store.prune_finished(cutoff) == []
    # the id is free again: the same request is a new job, not a repeat
    assert store.create(new_job("plain"))[1] is True
    # once its part ended, the canceled video goes too
    store.transition("busy.0", JobStatus.SUCCEEDED, set_field("finished_at", now))
    assert sorted(store.prune_finished(cutoff)) == [("busy", ""), ("busy.0", "")]


def test_prune_finished_takes_a_page_of_graphs_oldest_first(store: Store) -> None:
    old = time.time() - 7200
    for index in range(5):
        store.create(new_job(f"job{index}"))
        finish(store, f"job{index}", old - index)  # job4 oldest
    store.create_graph(parent_job("video", ["video.0"]), [part("video.0", "video")])
    finish(store, "video.0", old)
    store.transition("video", JobStatus.RUNNING)
    store.transition("video", JobStatus.SUCCEEDED, set_field("finished_at", old - 2.5))
    pages = []
    while page := store.prune_finished(time.time(), limit=2):
        pages.append(sorted(job_id for job_id, _ in page))
    assert pages == [["job3", "job4"], ["job2", "video", "video.0"], ["job0", "job1"]]


def test_prune_uploads_deletes_old_upload_records(store: Store) -> None:
    for n in range(5):
        store.add_upload(Upload(f"up_{n}", "face.png", "image/png", 10, 100.0 + n))
    assert store.prune_uploads(102.5, limit=2) == 2
    assert store.prune_uploads(102.5, limit=2) == 1
    assert store.prune_uploads(102.5, limit=2) == 0
    assert [store.get_upload(f"up_{n}") is None for n in range(5)] == [True] * 3 + [False] * 2


def test_retention_sweep_expires_files_then_prunes_records(store: Store, tmp_path: Path) -> None:
    """The retention pass on either store: files after OUTPUT_RETENTION_HOURS, records
    (a long video whole) after JOB_RECORD_RETENTION_DAYS, a page at a time."""
    settings = Settings(data_dir=tmp_path, output_retention_hours=1, job_record_retention_days=1)
    now = time.time()
    store.create_graph(parent_job("video", ["video.0"]), [part("video.0", "video")])
    finish(store, "video.0", now - 3 * 86400)
    store.transition("video", JobStatus.RUNNING)
    store.transition("video", JobStatus.SUCCEEDED, set_field("finished_at", now - 2 * 86400))
    for index in range(5):
        store.create(new_job(f"ancient{index}"))
        finish(store, f"ancient{index}", now - 2 * 86400 - index)
    for job_id, age in [("old", 7200), ("new", 0)]:
        store.create(new_job(job_id))
        finish(store, job_id, now - age)
    for job in store.page(None, 100, None).jobs:
        (settings.job_dir(job.id) / "outputs").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("model_service.retention.PAGE", 2)
        patch.setattr("model_service.retention.PRUNE_PAGE", 2)
        assert sweep(settings, store, now=now) == 8  # all but "new" had files
    assert ids(store.page(None, 100, None).jobs) == ["new", "old"]
    assert store.get("old").outputs_expired is True
    assert [path.name for path in (tmp_path / "jobs").iterdir()] == ["new"]


# --- Redis only --------------------------------------------------------------------------


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def test_two_clients_of_one_namespace_share_the_jobs(redis_url: str) -> None:
    one, two = RedisJobStore(redis_url, NAMESPACE), RedisJobStore(redis_url, NAMESPACE)
    one.create(new_job("a"))
    assert two.get("a").seed == 7
    assert two.create(new_job("a"))[1] is False
    two.transition("a", JobStatus.RUNNING)
    assert ids(one.running()) == ["a"]
    one.close()
    two.close()


def test_namespaces_are_isolated(redis_url: str) -> None:
    one, two = RedisJobStore(redis_url, "ms:one"), RedisJobStore(redis_url, "ms:two")
    one.create(new_job("a"))
    one.add_delivery(Delivery("msg", "a", "https://h.test/", "job.x", "{}", 0), time.time())
    one.add_upload(Upload("up", "f", None, 1, 1.0))
    assert two.find("a") is None
    assert two.create(new_job("a", request_hash="other"))[1] is True  # no conflict
    assert two.count(JobStatus.QUEUED) == one.count(JobStatus.QUEUED) == 1
    assert two.due_deliveries(time.time()) == []
    assert two.get_upload("up") is None
    assert one.get("a").request_hash == "h"
    one.close()
    two.close()


def race(workers: int, work: Callable[[int], list[str]]) -> list[list[str]]:
    """`work(i)` in `workers` threads started together; what each returned."""
    results: list[list[str]] = [[] for _ in range(workers)]
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def test_racing_claims_take_every_job_exactly_once(redis_url: str) -> None:
    setup = RedisJobStore(redis_url, NAMESPACE)
    job_ids = [f"j{n:02d}" for n in range(50)]
    for job_id in job_ids:
        setup.create(new_job(job_id))
    stores = [RedisJobStore(redis_url, NAMESPACE) for _ in range(2)]

    def claim_all(i: int) -> list[str]:
        taken = []
        while (job := stores[i].claim_next()) is not None:
            taken.append(job.id)
        return taken

    first, second = race(2, claim_all)
    assert sorted(first + second) == job_ids  # each exactly once
    assert first == sorted(first)  # each pod took them oldest first
    assert second == sorted(second)
    assert all(job.attempts == 1 for job in setup.running())
    assert setup.count(JobStatus.RUNNING) == 50
    assert setup.count(JobStatus.QUEUED) == 0
    for store in [setup, *stores]:
        store.close()


def test_racing_delivery_polls_never_share_a_delivery(redis_url: str) -> None:
    setup = RedisJobStore(redis_url, NAMESPACE)
    now = time.time()
    expected = [f"msg_{n:02d}" for n in range(40)]
    for n, delivery_id in enumerate(expected):
        setup.add_delivery(Delivery(delivery_id, "a", "https://h.test/", "e", "{}", 0), now - n)
    stores = [RedisJobStore(redis_url, NAMESPACE) for _ in range(2)]

    def poll_all(i: int) -> list[str]:
        got: list[str] = []
        while batch := stores[i].due_deliveries(now, limit=3):
            got += ids_of(batch)
        return got

    first, second = race(2, poll_all)
    assert sorted(first + second) == expected  # none twice, none lost
    # claimed, not sent: each comes back once its lease ends
    assert setup.due_deliveries(now) == []
    assert setup.next_delivery_due() == pytest.approx(now + RedisJobStore.DELIVERY_LEASE_S)
    later = now + RedisJobStore.DELIVERY_LEASE_S
    assert len(setup.due_deliveries(later, limit=100)) == 40
    setup.record_attempt("msg_00", state="delivered", next_attempt_at=0, error=None)
    assert len(setup.due_deliveries(later + RedisJobStore.DELIVERY_LEASE_S, limit=100)) == 39
    for store in [setup, *stores]:
        store.close()


def test_a_stopped_redis_is_store_unavailable_until_it_is_back(
    redis_server: RedisServer,
) -> None:
    store = RedisJobStore(redis_server.url, NAMESPACE)
    store.create(new_job("a"))
    redis_server.stop()
    calls: list[Callable[[], object]] = [
        lambda: store.find("a"),
        lambda: store.create(new_job("b")),
        lambda: store.update("a", set_field("seed", 1)),
        lambda: store.claim_next(),
        lambda: store.due_deliveries(time.time()),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as unavailable:
            call()
        assert time.monotonic() - started < 5
        assert unavailable.value.code == "store_unavailable"
        assert unavailable.value.status_code == 503
        assert unavailable.value.details == {"retry_after_s": 5}
        assert "QUEUE_URL" in unavailable.value.message
    redis_server.restart()  # same port, data kept (append-only file)
    assert store.get("a").seed == 7
    assert store.create(new_job("b"))[1] is True
    assert claim_id(store) == "a"
    store.close()


def test_redis_finished_before_reads_one_page_of_jobs(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's ids come from the N:finished index: only those jobs are read."""
    store = RedisJobStore(redis_url, NAMESPACE)
    old = time.time() - 7200
    for index in range(40):
        store.create(new_job(f"job{index:02d}"))
        finish(store, f"job{index:02d}", old + index)
    read: list[int] = []
    jobs = store._jobs
    monkeypatch.setattr(store, "_jobs", lambda job_ids: read.append(len(job_ids)) or jobs(job_ids))
    page = store.finished_before(time.time(), limit=5)
    assert ids(page) == [f"job{index:02d}" for index in range(5)]
    assert ids(store.finished_before(time.time(), limit=5, after=(old + 4, "job04")))[0] == "job05"
    assert sum(read) == 10  # each page its 5 jobs (the second past its tie), no more
    store.close()


def test_redis_retention_indexes_follow_the_records(redis_url: str) -> None:
    """A job is in N:finished while finished with outputs, in N:records while finished and
    top-level: set with the status, left on expiry (outputs only), retry and deletion."""
    store = RedisJobStore(redis_url, NAMESPACE)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)

    def entries(job_id: str) -> tuple[float | None, float | None]:
        return (
            raw.zscore(f"{NAMESPACE}:finished", job_id),
            raw.zscore(f"{NAMESPACE}:records", job_id),
        )

    store.create(new_job("a"))
    assert entries("a") == (None, None)
    finish(store, "a", 100.0, JobStatus.FAILED)
    assert entries("a") == (100.0, 100.0)
    store.update("a", set_field("finished_at", 50.0))
    assert entries("a") == (50.0, 50.0)
    store.update("a", set_field("outputs_expired", True))
    assert entries("a") == (None, 50.0)
    store.transition("a", JobStatus.QUEUED, set_field("finished_at", None))  # a retry
    assert entries("a") == (None, None)
    store.create_graph(parent_job("p", ["p.0"]), [part("p.0", "p")])
    finish(store, "p.0", 100.0)
    assert entries("p.0") == (100.0, None)  # a part goes with its parent only
    ended = new_job("stored-ended")  # a job stored already finished
    ended.status, ended.finished_at = JobStatus.FAILED, 5.0
    store.create(ended)
    assert entries("stored-ended") == (5.0, 5.0)
    store.remove_child("p", "p.0", lambda job: job.children.remove("p.0"))
    assert entries("p.0") == (None, None)
    raw.close()
    store.close()


def test_redis_indexes_are_built_once_for_records_written_before_them(redis_url: str) -> None:
    """A store written before the indexes existed: the first retention call builds them
    from the records (and sets N:indexed), then the pass finds the old jobs."""
    store = RedisJobStore(redis_url, NAMESPACE)
    for job_id in ["done", "expired", "running"]:
        store.create(new_job(job_id))
    finish(store, "done", 100.0)
    finish(store, "expired", 100.0)
    store.update("expired", set_field("outputs_expired", True))
    store.transition("running", JobStatus.RUNNING)
    store.create_graph(parent_job("p", ["p.0"]), [part("p.0", "p")])
    finish(store, "p.0", 90.0)
    store.transition("p", JobStatus.RUNNING)
    store.transition("p", JobStatus.SUCCEEDED, set_field("finished_at", 95.0))
    store.add_upload(Upload("up_1", "face.png", "image/png", 10, 80.0))
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    indexes = [f"{NAMESPACE}:{key}" for key in ("finished", "records", "uploads", "indexed")]
    raw.delete(*indexes)  # as an older version left the store
    store.close()

    store = RedisJobStore(redis_url, NAMESPACE)
    assert ids(store.finished_before(200.0)) == ["p.0", "p", "done"]
    assert raw.exists(f"{NAMESPACE}:indexed")
    assert sorted(store.prune_finished(200.0)) == [
        ("done", ""),
        ("expired", ""),
        ("p", ""),
        ("p.0", ""),
    ]
    assert store.prune_uploads(200.0) == 1
    assert ids(store.page(None, 10, None).jobs) == ["running"]
    # built once: with the marker there, a missing set is not rebuilt
    store.create(new_job("later"))
    finish(store, "later", 100.0)
    raw.delete(f"{NAMESPACE}:finished")
    assert RedisJobStore(redis_url, NAMESPACE).finished_before(200.0) == []
    raw.close()
    store.close()


# --- the request kept apart from the state --------------------------------------------


def big_job(job_id: str) -> Job:
    graph = {str(n): {"class_type": "KSampler", "inputs": {"seed": n}} for n in range(2000)}
    job = new_job(job_id)
    job.input, job.prepared_input = {"workflow": graph}, {"workflow": graph}
    job.webhook, job.webhook_events = "https://h.test/", ["job.succeeded"]
    return job


def stored_record(store: Store, job_id: str) -> tuple[str, str]:
    """The job's (state, request) text as the store holds them."""
    if isinstance(store, SqliteJobStore):
        row = store._db.execute("SELECT data, request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["data"], row["request"]
    assert isinstance(store, RedisJobStore)
    data, request = store._redis.hmget(store._key("job", job_id), ["data", "request"])
    return str(data), str(request)


def test_a_change_writes_the_state_and_leaves_the_request_as_written(store: Store) -> None:
    """A 2000-node workflow is written once, with the job; a claim, a progress write and
    the end save only the small state, and every read has the whole job."""
    store.create(big_job("a"))
    _, request = stored_record(store, "a")
    assert len(request) > 50_000
    store.claim_next()
    store.update("a", set_field("progress_step", 3), durable=False)
    store.transition("a", JobStatus.SUCCEEDED, set_field("outputs", ["o.png"]))
    state, request_after = stored_record(store, "a")
    assert request_after == request
    assert len(state) < 2_000
    assert "workflow" not in state
    job = store.get("a")
    assert job.input == big_job("a").input
    assert job.prepared_input == big_job("a").prepared_input
    assert (job.webhook, job.webhook_events) == ("https://h.test/", ["job.succeeded"])
    assert (job.status, job.progress_step, job.outputs) == (JobStatus.SUCCEEDED, 3, ["o.png"])
    assert ids(store.page(None, 10, None).jobs) == ["a"]


def test_sqlite_store_of_one_record_per_job_is_split_on_open(tmp_path: Path) -> None:
    """A store from before the split (the whole job in `data`, no `request` column):
    opening it moves each job's request out of `data`; its jobs read and run as before."""
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    store.create(big_job("old"))
    store.close()
    whole = json.dumps(big_job("old").to_row())
    with sqlite3.connect(path) as db:  # as the store was before: no request column
        db.execute("ALTER TABLE jobs DROP COLUMN request")
        db.execute("UPDATE jobs SET data = ?", (whole,))
    store = SqliteJobStore(path)
    state, request = stored_record(store, "old")
    assert "workflow" not in state
    assert json.loads(request) == big_job("old").request_row()
    claimed = store.claim_next()
    assert claimed is not None
    assert claimed.prepared_input == big_job("old").prepared_input
    store.transition("old", JobStatus.SUCCEEDED)
    assert store.get("old").input == big_job("old").input
    store.close()


def test_redis_record_of_one_field_per_job_is_split_on_its_first_change(redis_url: str) -> None:
    """A job written before the split (the whole job in `data`, no `request` field)
    reads whole, and its first change writes the request apart."""
    store = RedisJobStore(redis_url, NAMESPACE)
    store.create(big_job("old"))
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    key = f"{NAMESPACE}:job:old"
    raw.hset(key, "data", json.dumps(big_job("old").to_row()))
    raw.hdel(key, "request")
    assert store.get("old").input == big_job("old").input
    claimed = store.claim_next()
    assert claimed is not None
    assert claimed.prepared_input == big_job("old").prepared_input
    state, request = stored_record(store, "old")
    assert "workflow" not in state
    assert json.loads(request) == big_job("old").request_row()
    store.transition("old", JobStatus.SUCCEEDED)
    assert store.get("old").input == big_job("old").input
    raw.close()
    store.close()


def test_a_jobs_log_is_kept_apart_and_replaced(store: Store) -> None:
    store.create(new_job("j"))
    assert store.job_log("j") is None
    store.save_log("j", ["2026-01-01T00:00:00.000Z info x: one", "two ü"])
    assert store.job_log("j") == ["2026-01-01T00:00:00.000Z info x: one", "two ü"]
    assert store.get("j").info == {}  # not part of the record
    store.save_log("j", ["again"])
    assert store.job_log("j") == ["again"]
    store.save_log("gone", ["x"])  # no such job: nothing kept
    assert store.job_log("gone") is None
