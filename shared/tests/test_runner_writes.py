"""The store writes a job costs (issue 25): on an idle engine, two (the claim, which
records the start, and the end, which puts the engine's own start time in its place);
taken ahead (JOBS_AHEAD, the engine busy), three (its start is written when the engine
begins it). Recovery still tells a job begun from one only taken ahead. In-process: the
runner on a stand-in engine, the store counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_service.engine import ProgressSink, StartedSink
from model_service.jobs.events import EventBus
from model_service.jobs.feed import JobChange
from model_service.jobs.record import Job
from model_service.jobs.source import LocalSource
from model_service.jobs.status import JobStatus
from model_service.jobs.store import SqliteJobStore
from model_service.metrics import Metrics
from model_service.runner import JobRunner
from model_service.settings import Settings
from model_service.worker.protocol import JobDone, RunJob


class CountingStore(SqliteJobStore):
    """Records each write of a job, and the runner's reads by id: (method, job id)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[tuple[str, str]] = []

    def update(self, job_id: str, change: Callable[[Job], None], durable: bool = True) -> Job:
        self.writes.append(("update", job_id))
        return super().update(job_id, change, durable)

    def get(self, job_id: str) -> Job:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop: not the runner
            task = None
        if task is not None and task.get_name() == "job":  # a read on the runner's job path
            self.writes.append(("get", job_id))
        return super().get(job_id)

    def transition(
        self,
        job_id: str,
        target: JobStatus | Callable[[Job], JobStatus],
        change: Callable[[Job], None] | None = None,
        durable: bool = True,
    ) -> Job:
        self.writes.append(("transition", job_id))
        return super().transition(job_id, target, change, durable)

    def claim_next(self, starts_now: bool = False) -> Job | None:
        job = super().claim_next(starts_now)
        if job is not None:  # an empty claim writes nothing
            self.writes.append(("claim", job.id))
        return job

    def of(self, job_id: str) -> list[str]:
        return [method for method, written in self.writes if written == job_id]


class StandinEngine:
    """Runs one job at a time in the order given; each runs until `hold` is set."""

    def __init__(self) -> None:
        self._turn = asyncio.Lock()
        self.hold = asyncio.Event()
        self.hold.set()
        self.began: dict[str, float] = {}

    @property
    def readiness(self) -> tuple[bool, str]:
        return True, "ready"

    @property
    def info(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        pass

    async def stop(self, *, abandon_running: bool) -> None:
        pass

    async def wait_ready(self) -> bool:
        return True

    async def run(self, job: RunJob, on_progress: ProgressSink, on_started: StartedSink) -> JobDone:
        async with self._turn:
            await asyncio.sleep(0.01)  # the engine's own start comes after the claim
            began = self.began[job.job_id] = time.time()
            on_started()
            await self.hold.wait()
            return JobDone(job.job_id, started_at=began, ended_at=time.time())

    def cancel(self, job_id: str) -> None:
        pass

    def kill(self, job_id: str) -> None:
        pass


def new_job(job_id: str) -> Job:
    return Job(job_id, JobStatus.QUEUED, {}, {}, 1, "h")


def make_runner(tmp_path: Path) -> tuple[CountingStore, JobRunner, StandinEngine]:
    settings = Settings(data_dir=tmp_path / "data")  # JOBS_AHEAD: 1 on one machine
    store = CountingStore(tmp_path / "jobs.sqlite3")
    bus = EventBus()
    bus.follow(store.changes)
    engine = StandinEngine()
    metrics = Metrics("test", lambda: 0.0)
    runner = JobRunner(settings, engine, store, bus, metrics, LocalSource(settings, store))
    return store, runner, engine


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_a_job_on_an_idle_engine_costs_two_writes(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, runner, engine = make_runner(tmp_path)
        published: list[JobChange] = []
        await runner.start()
        try:
            store.create(new_job("a"))
            store.changes.subscribe(published.append)
            runner.wake()
            await until(lambda: store.get("a").status is JobStatus.SUCCEEDED)
            assert store.of("a") == ["claim", "transition"]
            assert len(published) == 2  # one change per write
            job = store.get("a")
            assert job.started_at == engine.began["a"]  # the engine's own time, at the end
            assert job.attempts == 1
        finally:
            await runner.stop()
            store.close()

    asyncio.run(scenario())


def test_a_job_taken_ahead_costs_three_writes(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, runner, engine = make_runner(tmp_path)
        engine.hold.clear()  # the first job runs until we let it end
        await runner.start()
        try:
            store.create(new_job("a"))
            store.create(new_job("b"))
            runner.wake()
            await until(lambda: store.get("b").status is JobStatus.RUNNING)
            assert store.get("a").started_at is not None  # its claim recorded it
            assert store.get("b").started_at is None  # it waits behind the first
            engine.hold.set()
            await until(lambda: store.get("b").status is JobStatus.SUCCEEDED)
            assert store.of("a") == ["claim", "transition"]
            assert store.of("b") == ["claim", "update", "transition"]
            b = store.get("b")
            assert b.started_at is not None
            assert b.started_at >= engine.began["a"]
        finally:
            await runner.stop()
            store.close()

    asyncio.run(scenario())


def test_recovery_counts_a_claim_that_started_and_not_one_taken_ahead(tmp_path: Path) -> None:
    store, runner, _engine = make_runner(tmp_path)
    for job_id in ("began", "ahead"):
        store.create(new_job(job_id))
    assert store.claim_next(starts_now=True) is not None  # "began": the engine was idle
    assert store.claim_next() is not None  # "ahead": it waited behind "began"
    runner.recover()  # as after a kill -9
    began, ahead = store.get("began"), store.get("ahead")
    assert (began.status, began.attempts) == (JobStatus.QUEUED, 1)  # it ran: counted
    assert (ahead.status, ahead.attempts) == (JobStatus.QUEUED, 0)  # it never began
    store.close()
