"""The job state machine, explored by Hypothesis against both stores (SQLite and Redis).

A model (each job's status, in creation order) is the oracle: any sequence of creates,
repeats, transitions (allowed or not), claims, cancels and retries must leave each store
exactly where `TRANSITIONS` says, with nothing lost and nothing run twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from model_service.errors import IdempotencyConflict, InvalidTransition
from model_service.jobs.record import Job
from model_service.jobs.redis_store import RedisJobStore
from model_service.jobs.status import TERMINAL, TRANSITIONS, JobStatus
from model_service.jobs.store import JobStore, SqliteJobStore
from model_service_testing.process import RedisServer

IDS = st.sampled_from([f"job{n}" for n in range(6)])
STATUSES = st.sampled_from(list(JobStatus))
RUNS = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # the same sequences on every run: CI never flakes on a new one
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)


def job_machine(open_store: Callable[[], JobStore]) -> type[RuleBasedStateMachine]:
    class JobStateMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.store = open_store()
            self.model: dict[str, JobStatus] = {}  # insertion order is creation order
            self.attempts: dict[str, int] = {}

        @initialize()
        def empty(self) -> None:
            assert self.store.count(JobStatus.QUEUED) == 0

        @rule(job_id=IDS, same_request=st.booleans())
        def create(self, job_id: str, same_request: bool) -> None:
            request_hash = "h" if same_request or job_id not in self.model else "other"
            job = Job(job_id, JobStatus.QUEUED, {"n": 1}, {"n": 1}, 7, request_hash)
            if job_id in self.model and request_hash != "h":
                with pytest.raises(IdempotencyConflict):
                    self.store.create(job)
                return
            stored, created = self.store.create(job)
            assert created is (job_id not in self.model)
            if created:
                self.model[job_id] = JobStatus.QUEUED
                self.attempts[job_id] = 0
            assert stored.status is self.model[job_id]

        @precondition(lambda self: bool(self.model))
        @rule(data=st.data(), status=STATUSES)
        def transition(self, data: st.DataObject, status: JobStatus) -> None:
            job_id = data.draw(st.sampled_from(sorted(self.model)))
            if status in TRANSITIONS[self.model[job_id]]:
                moved = self.store.transition(job_id, status)
                assert moved.status is status
                self.model[job_id] = status
            else:
                with pytest.raises(InvalidTransition):
                    self.store.transition(job_id, status)

        @rule()
        def claim(self) -> None:
            queued = [job_id for job_id, status in self.model.items() if status is JobStatus.QUEUED]
            claimed = self.store.claim_next()
            if not queued:
                assert claimed is None
                return
            assert claimed is not None
            assert claimed.id == queued[0]  # the oldest queued job, once
            assert claimed.status is JobStatus.RUNNING
            self.model[claimed.id] = JobStatus.RUNNING
            self.attempts[claimed.id] += 1
            assert claimed.attempts == self.attempts[claimed.id]

        @invariant()
        def each_job_is_where_the_model_says(self) -> None:
            for job_id, status in self.model.items():
                assert self.store.get(job_id).status is status, job_id
            for status in JobStatus:
                expected = sum(1 for s in self.model.values() if s is status)
                assert self.store.count(status) == expected, status
            running = [job_id for job_id, s in self.model.items() if s is JobStatus.RUNNING]
            assert [job.id for job in self.store.running()] == running

        @invariant()
        def finished_jobs_only_move_by_retry_or_reopen(self) -> None:
            for status in TERMINAL:
                assert TRANSITIONS[status] <= {JobStatus.QUEUED, JobStatus.AWAITING_INPUT}

        def teardown(self) -> None:
            self.store.close()

    return JobStateMachine


def test_sqlite_store_follows_the_state_machine(tmp_path: Path) -> None:
    paths = (tmp_path / f"jobs{n}.sqlite3" for n in itertools.count())
    run_state_machine_as_test(job_machine(lambda: SqliteJobStore(next(paths))), settings=RUNS)


def test_redis_store_follows_the_state_machine(redis_server: RedisServer) -> None:
    namespaces = (f"ms:machine{n}" for n in itertools.count())
    machine = job_machine(lambda: RedisJobStore(redis_server.url, next(namespaces)))
    run_state_machine_as_test(machine, settings=RUNS)
