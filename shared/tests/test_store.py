"""The SQLite job store and the state machine, on real files."""

import sqlite3
import time
from pathlib import Path

import pytest

from model_service.errors import IdempotencyConflict, InvalidTransition, NotFound
from model_service.jobs.record import Job
from model_service.jobs.status import TERMINAL, TRANSITIONS, JobStatus
from model_service.jobs.store import JobStore
from model_service.retention import sweep
from model_service.settings import Settings


def new_job(job_id: str, request_hash: str = "h") -> Job:
    return Job(job_id, JobStatus.QUEUED, {"x": 1}, {"x": 1}, 7, request_hash)


def test_store_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create(new_job("a"))
    store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert JobStore(tmp_path / "jobs.sqlite3").get("a").seed == 7


def test_create_is_idempotent_by_id_and_hash(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert store.create(new_job("a"))[1] is True
    assert store.create(new_job("a"))[1] is False
    with pytest.raises(IdempotencyConflict):
        store.create(new_job("a", request_hash="other"))
    with pytest.raises(NotFound):
        store.get("missing")


def test_state_machine_refuses_illegal_moves(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create(new_job("a"))
    with pytest.raises(InvalidTransition):
        store.transition("a", JobStatus.SUCCEEDED)  # queued jobs must run first
    claimed = store.claim_next()
    assert claimed is not None
    assert (claimed.status, claimed.attempts) == (JobStatus.RUNNING, 1)
    store.transition("a", JobStatus.SUCCEEDED)
    for target in JobStatus:
        with pytest.raises(InvalidTransition):
            store.transition("a", target)
    assert all(not TRANSITIONS[status] for status in TERMINAL)
    assert all(status.is_terminal for status in TERMINAL)
    assert not JobStatus.RUNNING.is_terminal


def test_claim_is_fifo(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    for job_id in ["first", "second", "third"]:
        store.create(new_job(job_id))
    claimed = [store.claim_next() for _ in range(4)]
    assert [job.id if job else None for job in claimed] == ["first", "second", "third", None]


def test_retention_deletes_old_job_files_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, output_retention_hours=1)
    store = JobStore(settings.db_path)
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
