"""The SQLite job store and the state machine, on real files."""

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from model_service.errors import IdempotencyConflict, InvalidTransition, NotFound
from model_service.jobs.record import Job
from model_service.jobs.status import TERMINAL, TRANSITIONS, JobStatus
from model_service.jobs.store import _PRUNABLE, Delivery, SqliteJobStore, Upload
from model_service.retention import prune, sweep
from model_service.settings import Settings


def new_job(job_id: str, request_hash: str = "h") -> Job:
    return Job(job_id, JobStatus.QUEUED, {"x": 1}, {"x": 1}, 7, request_hash)


def test_store_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(new_job("a"))
    store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert SqliteJobStore(tmp_path / "jobs.sqlite3").get("a").seed == 7


def test_create_is_idempotent_by_id_and_hash(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    assert store.create(new_job("a"))[1] is True
    assert store.create(new_job("a"))[1] is False
    with pytest.raises(IdempotencyConflict):
        store.create(new_job("a", request_hash="other"))
    with pytest.raises(NotFound):
        store.get("missing")


def test_state_machine_refuses_illegal_moves(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(new_job("a"))
    with pytest.raises(InvalidTransition):
        store.transition("a", JobStatus.SUCCEEDED)  # queued jobs must run first
    claimed = store.claim_next()
    assert claimed is not None
    assert (claimed.status, claimed.attempts) == (JobStatus.RUNNING, 1)
    store.transition("a", JobStatus.SUCCEEDED)
    for target in set(JobStatus) - {JobStatus.AWAITING_INPUT}:  # only a reopen leaves it
        with pytest.raises(InvalidTransition):
            store.transition("a", target)
    # a finished job moves again only by a client's retry (failed, canceled) or reopen
    assert TRANSITIONS[JobStatus.SUCCEEDED] == {JobStatus.AWAITING_INPUT}
    assert TRANSITIONS[JobStatus.FAILED] == TRANSITIONS[JobStatus.CANCELED] == {JobStatus.QUEUED}
    assert all(status.is_terminal and status.is_settled for status in TERMINAL)
    assert JobStatus.AWAITING_INPUT.is_settled
    assert not JobStatus.AWAITING_INPUT.is_terminal
    assert not JobStatus.RUNNING.is_terminal


def part(job_id: str, parent: str, depends_on: list[str] | None = None) -> Job:
    job = new_job(job_id)
    job.parent_id, job.depends_on = parent, depends_on or []
    return job


def test_graph_claims_follow_dependencies_and_skip_parents(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    parent = new_job("p")
    parent.kind = "chain"
    children = [part("p.0", "p"), part("p.1", "p", ["p.0"]), part("p.2", "p", ["p.1"])]
    assert store.create_graph(parent, children)[1] is True
    assert store.create_graph(parent, children)[1] is False  # idempotent by id and hash
    store.create(new_job("other"))
    assert [c.id for c in store.children("p")] == ["p.0", "p.1", "p.2"]
    first = store.claim_next()
    assert first is not None
    assert first.id == "p.0"
    # p.1 waits for p.0: the next claim is the unrelated job, then nothing
    second = store.claim_next()
    assert second is not None
    assert second.id == "other"
    assert store.claim_next() is None
    assert store.count(JobStatus.QUEUED) == 2  # p.1, p.2; the parent is not queue work
    store.transition("p.0", JobStatus.FAILED)
    assert store.claim_next() is None  # a failed dependency never releases p.1
    store.transition("p.0", JobStatus.QUEUED)  # retry
    claimed = store.claim_next()
    assert claimed is not None
    assert claimed.id == "p.0"
    store.transition("p.0", JobStatus.SUCCEEDED)
    claimed = store.claim_next()
    assert claimed is not None
    assert claimed.id == "p.1"
    store.transition("p", JobStatus.RUNNING)  # as the coordinator keeps it
    assert [job.id for job in store.running()] == ["p.1", "other"]  # never the parent
    assert [job.id for job in store.open_parents()] == ["p"]


def test_graph_children_added_and_removed_atomically(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    parent = new_job("p")
    parent.kind, parent.children = "chain", ["p.0"]
    store.create_graph(parent, [part("p.0", "p")])
    store.add_children("p", [part("p.1", "p", ["p.0"])], lambda job: job.children.append("p.1"))
    assert store.get("p").children == ["p.0", "p.1"]
    store.remove_child("p", "p.1", lambda job: job.children.remove("p.1"))
    assert store.find("p.1") is None
    assert store.get("p").children == ["p.0"]
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM job_deps").fetchone()[0] == 0


def test_store_of_the_first_release_opens_and_gains_graph_columns(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:  # the jobs table as the first release made it
        db.execute(
            "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL "
            "UNIQUE, status TEXT NOT NULL, created_at REAL NOT NULL, data TEXT NOT NULL)"
        )
        old = {
            k: v
            for k, v in new_job("old").to_row().items()
            if k not in ("kind", "parent_id", "children", "depends_on", "inputs_from", "plan")
        }
        db.execute(
            "INSERT INTO jobs (id, status, created_at, data) VALUES (?, ?, ?, ?)",
            ("old", "queued", 1.0, json.dumps(old)),
        )
    store = SqliteJobStore(path)
    job = store.claim_next()
    assert job is not None
    assert job.id == "old"
    assert job.kind == "job"


def test_claim_is_fifo(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    for job_id in ["first", "second", "third"]:
        store.create(new_job(job_id))
    claimed = [store.claim_next() for _ in range(4)]
    assert [job.id if job else None for job in claimed] == ["first", "second", "third", None]


@pytest.mark.parametrize("damage", ["{not json", '{"status": "no such status"}', "[]"])
def test_one_unreadable_row_spoils_no_list_and_stops_no_runner(tmp_path: Path, damage: str) -> None:
    """A row whose JSON cannot be read (a disk fault, a hand edit) is left out of every
    list and skipped, marked failed, by the runner's claim; the others go on."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    for job_id in ["first", "broken", "third"]:
        store.create(new_job(job_id))
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET data = ? WHERE id = 'broken'", (damage,))
    assert [job.id for job in store.page(None, 10, None).jobs] == ["third", "first"]
    assert [job.id for job in store.runnable()] == ["first", "third"]
    claimed = [store.claim_next() for _ in range(3)]
    assert [job.id if job else None for job in claimed] == ["first", "third", None]
    assert store.count(JobStatus.FAILED) == 1  # the broken row, out of the queue
    assert [job.id for job in store.running()] == ["first", "third"]


def test_retention_deletes_old_job_files_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, output_retention_hours=1)
    store = SqliteJobStore(settings.db_path)
    for job_id in ["old", "new"]:
        store.create(new_job(job_id))
        store.claim_next()
        store.transition(job_id, JobStatus.SUCCEEDED, lambda job: setattr(job, "outputs", ["o"]))
        (settings.job_dir(job_id) / "outputs").mkdir(parents=True)
        (settings.job_dir(job_id) / "outputs" / "o").write_text("x")
    store.update("old", lambda job: setattr(job, "finished_at", time.time() - 7200))
    assert sweep(settings, store) == 1
    assert not settings.job_dir("old").exists()
    assert settings.job_dir("new").exists()
    assert store.get("old").outputs_expired is True
    assert sweep(settings, store) == 0


def test_retention_reads_the_store_a_page_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`finished_before` pages oldest first by (finished_at, id) from an index; the sweep
    goes through every page, skipping in a fleet the jobs another pod holds."""
    settings = Settings(data_dir=tmp_path, output_retention_hours=1)
    store = SqliteJobStore(settings.db_path)
    old = time.time() - 7200
    for index in range(7):
        job_id = f"job{index}"
        store.create(new_job(job_id))
        store.claim_next()
        store.transition(job_id, JobStatus.SUCCEEDED)
        store.update(job_id, lambda job, i=index: setattr(job, "finished_at", old + i % 3))
    store.update("job5", lambda job: setattr(job, "held_by", "http://other-pod"))
    pages, after = [], None
    while page := store.finished_before(time.time() - 3600, limit=3, after=after):
        pages.append([job.id for job in page])
        after = (page[-1].finished_at or 0.0, page[-1].id)
    assert pages == [["job0", "job3", "job6"], ["job1", "job4", "job2"], ["job5"]]
    monkeypatch.setattr("model_service.retention.PAGE", 2)
    assert sweep(settings, store) == 6  # all but the other pod's
    assert [job.id for job in store.finished_before(time.time())] == ["job5"]
    with sqlite3.connect(settings.db_path) as db:
        plan = " ".join(
            str(row[3])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE outputs_expired = 0 "
                "AND finished_at < 1 ORDER BY finished_at, id LIMIT 5"
            )
        )
    assert "jobs_retention" in plan


def test_an_older_store_gains_the_retention_columns_from_its_records(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    store.create(new_job("done"))
    store.claim_next()
    store.transition("done", JobStatus.SUCCEEDED, lambda job: setattr(job, "finished_at", 5.0))
    store.close()
    with sqlite3.connect(path) as db:  # as a store from before the columns existed
        db.execute("DROP INDEX jobs_retention")
        db.execute("DROP INDEX jobs_records")
        db.execute("ALTER TABLE jobs DROP COLUMN finished_at")
        db.execute("ALTER TABLE jobs DROP COLUMN outputs_expired")
    reopened = SqliteJobStore(path)
    assert [job.id for job in reopened.finished_before(10.0)] == ["done"]
    assert reopened.finished_before(4.0) == []


def test_fleet_retention_also_deletes_copies_of_other_pods_jobs(tmp_path: Path) -> None:
    """A fleet pod keeps input files of jobs it took the requests of, and part files it
    fetched: deleted once old and finished; the other pods' records are left alone."""
    settings = Settings(data_dir=tmp_path, output_retention_hours=1)
    store = SqliteJobStore(settings.db_path)
    here, there = "http://pod-a:8189", "http://pod-b:8189"
    old = time.time() - 7200
    for job_id, holder, finished in [
        ("mine", here, True),
        ("theirs", there, True),
        ("theirs-new", there, True),
        ("theirs-running", there, False),
    ]:
        store.create(new_job(job_id))
        store.claim_next()
        store.update(job_id, lambda job, h=holder: setattr(job, "held_by", h))
        if finished:
            store.transition(job_id, JobStatus.SUCCEEDED)
            store.update(job_id, lambda job: setattr(job, "finished_at", old))
        (settings.job_dir(job_id) / "inputs").mkdir(parents=True)
        (settings.job_dir(job_id) / "inputs" / "image.png").write_text("x")
        if job_id != "theirs-new":
            for folder in (settings.job_dir(job_id), settings.job_dir(job_id) / "inputs"):
                os.utime(folder, (old, old))
    (settings.job_dir("gone") / "outputs").mkdir(parents=True)  # a record deleted since
    for folder in (settings.job_dir("gone"), settings.job_dir("gone") / "outputs"):
        os.utime(folder, (old, old))

    assert sweep(settings, store, held_by=here) == 1  # its own job, as before
    assert store.get("mine").outputs_expired is True
    assert not settings.job_dir("theirs").exists()
    assert not settings.job_dir("gone").exists()
    assert settings.job_dir("theirs-new").exists()  # touched lately
    assert settings.job_dir("theirs-running").exists()  # not finished
    assert store.get("theirs").outputs_expired is False  # its own pod deletes its files


def _chain(job_id: str) -> Job:
    job = new_job(job_id)
    job.kind = "chain"
    return job


def finished(store: SqliteJobStore, job_id: str, at: float, held_by: str = "") -> None:
    store.transition(job_id, JobStatus.RUNNING)
    store.transition(
        job_id,
        JobStatus.SUCCEEDED,
        lambda job: (setattr(job, "finished_at", at), setattr(job, "held_by", held_by)),
    )


def test_prune_deletes_rows_deps_and_deliveries_through_indexes(tmp_path: Path) -> None:
    """The graph's rows, its `job_deps` and `webhook_deliveries` rows go in one call; the
    candidates come from `jobs_records`, what goes with them from indexes too."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create_graph(_chain("p"), [part("p.0", "p"), part("p.1", "p", ["p.0"])])
    store.create(new_job("kept"))
    store.create_graph(_chain("q"), [part("q.0", "q")])
    for job_id in ["p.0", "p.1", "p", "q.0", "q"]:
        finished(store, job_id, 100.0)
    finished(store, "kept", 300.0)
    for n, job_id in enumerate(["p", "p.1", "kept"]):
        store.add_delivery(Delivery(f"d{n}", job_id, "https://hook", "job.succeeded", "{}", 0), 1)
    assert [job_id for job_id, _ in store.prune_finished(200.0, limit=1)] == ["p", "p.0", "p.1"]
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM job_deps").fetchone()[0] == 0
        assert [row[0] for row in db.execute("SELECT job_id FROM webhook_deliveries")] == ["kept"]
        assert [row[0] for row in db.execute("SELECT id FROM jobs ORDER BY seq")] == [
            "kept",
            "q",
            "q.0",
        ]

        def plan(query: str, *params: object) -> str:
            rows = db.execute("EXPLAIN QUERY PLAN " + query, params)
            return " ".join(str(row[3]) for row in rows)

        assert "USING INDEX jobs_records (finished_at<?)" in plan(_PRUNABLE, 1.0, *"abc", *"abc", 5)
        assert "deliveries_job" in plan("DELETE FROM webhook_deliveries WHERE job_id = ?", "x")
        assert "uploads_created" in plan(
            "DELETE FROM uploads WHERE id IN (SELECT id FROM uploads WHERE created_at < 1 LIMIT 5)"
        )


def test_retention_prunes_old_records_with_their_folders(tmp_path: Path) -> None:
    """End to end: files expire after OUTPUT_RETENTION_HOURS, records (a long video with
    its parts) after JOB_RECORD_RETENTION_DAYS; a pruned job's folder goes where this pod
    holds it; old upload records go; 0 keeps records."""
    settings = Settings(data_dir=tmp_path, output_retention_hours=1, job_record_retention_days=1)
    store = SqliteJobStore(settings.db_path)
    now = time.time()
    store.create_graph(_chain("video"), [part("video.0", "video")])
    for job_id in ["ancient", "theirs", "old", "new"]:
        store.create(new_job(job_id))
    finished(store, "video.0", now - 3 * 86400)
    finished(store, "video", now - 2 * 86400)
    finished(store, "ancient", now - 2 * 86400)
    finished(store, "theirs", now - 2 * 86400, held_by="http://other-pod")
    finished(store, "old", now - 7200)
    finished(store, "new", now)
    for job_id in ["video", "video.0", "ancient", "theirs", "old", "new"]:
        (settings.job_dir(job_id) / "outputs").mkdir(parents=True)
    store.add_upload(Upload("up_old", "a.png", None, 1, now - 2 * 86400))
    store.add_upload(Upload("up_new", "b.png", None, 1, now - 7200))

    kept = Settings(data_dir=tmp_path, output_retention_hours=1, job_record_retention_days=0)
    assert prune(kept, store, now=now) == 0
    assert store.find("ancient") is not None

    assert prune(settings, store, now=now) == 4  # the records alone
    for job_id in ["video", "video.0", "ancient", "theirs"]:
        assert store.find(job_id) is None
    assert [job.id for job in store.page(None, 10, None).jobs] == ["new", "old"]
    assert not settings.job_dir("video.0").exists()
    assert not settings.job_dir("ancient").exists()
    assert settings.job_dir("theirs").exists()  # the other pod's: its own sweep's
    assert settings.job_dir("old").exists()  # its record stays: its files are `sweep`'s
    assert store.get_upload("up_old") is None
    assert store.get_upload("up_new") is not None

    assert sweep(settings, store, now=now) == 1
    assert store.get("old").outputs_expired is True
    assert not settings.job_dir("old").exists()
    assert settings.job_dir("new").exists()
    assert sweep(settings, store, now=now) == 0


def test_records_kept_shorter_than_outputs_take_their_files(tmp_path: Path) -> None:
    """With records kept 12 hours and outputs 72 (or forever), a job's files go with its
    record: files never outlive it."""
    for hours in (72.0, 0.0):
        settings = Settings(
            data_dir=tmp_path / str(hours),
            output_retention_hours=hours,
            job_record_retention_days=0.5,
        )
        store = SqliteJobStore(settings.db_path)
        now = time.time()
        for job_id, age in [("day-old", 86400), ("hour-old", 3600)]:
            store.create(new_job(job_id))
            finished(store, job_id, now - age)
            (settings.job_dir(job_id) / "outputs").mkdir(parents=True)
        sweep(settings, store, now=now)
        assert store.find("day-old") is None
        assert not settings.job_dir("day-old").exists()
        assert settings.job_dir("hour-old").exists()
        assert store.get("hour-old").outputs_expired is False
        store.close()
