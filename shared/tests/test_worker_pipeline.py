"""The worker's job pipeline with real spawned worker processes (no mocks).

Several jobs are handed to the worker at once; the next one's `prepare` runs while the
current one's `predict` runs, and a job's `finish` runs while the next one's `predict`
runs. The predictor (`model_service_testing.echo.pipeline_predictor`) sleeps in each stage and
records when it ran.
"""

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from model_service.engine import WorkerEngine
from model_service.errors import WorkerCrashed
from model_service.metrics import Metrics
from model_service.predictor import WorkerConfig
from model_service.worker.process import WorkerProcess, WorkerState
from model_service.worker.protocol import JobDone, JobProgress, RunJob

PREDICTOR = "model_service_testing.echo.pipeline_predictor:PipelinePredictor"
START_GAP_S = 0.02  # the next job starts this soon after the GPU work of the one before

Runner = Callable[[RunJob, Callable[[JobProgress], None], Callable[[], None]], Awaitable[JobDone]]


def config(tmp_path: Path) -> WorkerConfig:
    return WorkerConfig(
        profile="tiny",
        models_dir=tmp_path,
        data_dir=tmp_path,
        log_level="WARNING",
        log_format="console",
    )


def job(tmp_path: Path, job_id: str, **inputs: Any) -> RunJob:
    stages = {"prepare_s": 0.2, "predict_s": 0.1, "finish_s": 0.2}
    return RunJob(job_id, stages | inputs, str(tmp_path / job_id), seed=0)


class Jobs:
    """Hands jobs over the way the runner does, and records what the API side saw."""

    def __init__(self, run: Runner) -> None:
        self._run = run
        self.events: list[tuple[str, str]] = []  # ("started" | "done" | "crashed", job_id)
        self.steps: dict[str, list[int]] = {}
        self.started: dict[str, asyncio.Event] = {}

    def start(self, run: RunJob) -> asyncio.Task[JobDone]:
        self.steps[run.job_id] = []
        self.started[run.job_id] = asyncio.Event()
        return asyncio.create_task(self._one(run))

    async def _one(self, run: RunJob) -> JobDone:
        def on_progress(progress: JobProgress) -> None:
            self.steps[run.job_id].append(progress.step)

        def on_started() -> None:
            self.events.append(("started", run.job_id))
            self.started[run.job_id].set()

        try:
            done = await self._run(run, on_progress, on_started)
        except WorkerCrashed:
            self.events.append(("crashed", run.job_id))
            raise
        self.events.append(("done", run.job_id))
        return done


async def started_worker(tmp_path: Path) -> WorkerProcess:
    worker = WorkerProcess(PREDICTOR, config(tmp_path))
    await worker.wait_started()
    assert worker.state is WorkerState.READY, worker.reason
    return worker


def run_async(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, timeout=20))


def test_next_job_is_prepared_meanwhile_and_starts_when_the_gpu_is_free(tmp_path: Path) -> None:
    async def scenario() -> None:
        worker = await started_worker(tmp_path)
        jobs = Jobs(worker.run)
        # the first job's GPU work outlasts the second one's prepare
        first = jobs.start(job(tmp_path, "a", predict_s=0.3))
        second = jobs.start(job(tmp_path, "b"))
        await asyncio.sleep(0)
        assert worker.state is WorkerState.BUSY
        a, b = await first, await second
        assert worker.state is WorkerState.READY
        await worker.stop()

        for done in (a, b):
            assert (done.error, done.outputs) == (None, ["out.txt"])
            assert (tmp_path / done.job_id / "out.txt").read_text() == done.job_id
            assert jobs.steps[done.job_id] == [1, 2, 3, 4, 5]
        ta, tb = a.info["timings"], b.info["timings"]
        assert None not in (a.started_at, a.ended_at, b.started_at, b.ended_at)
        # started_at/ended_at frame the GPU work (predict), in order
        assert a.started_at <= ta["predict"][0] < ta["predict"][1] <= a.ended_at
        assert a.ended_at <= b.started_at <= tb["predict"][0] < tb["predict"][1] <= b.ended_at
        # b was decoded while a ran on the GPU (its prepare began as a was handed over) ...
        assert abs(tb["prepare"][0] - ta["predict"][0]) < START_GAP_S
        assert tb["prepare"][1] < ta["predict"][1]
        # ... and started the moment a's GPU work ended, before a's outputs were written
        assert b.started_at - a.ended_at < START_GAP_S
        assert b.started_at < ta["finish"][0] + 0.1 < ta["finish"][1]
        assert ta["finish"][1] <= tb["finish"][0]  # one output thread: in order
        assert jobs.events == [("started", "a"), ("started", "b"), ("done", "a"), ("done", "b")]

    run_async(scenario())


@pytest.mark.parametrize("when", ["before_its_prepare", "once_prepared"])
def test_cancel_of_a_waiting_job_ends_it_at_once_never_started(tmp_path: Path, when: str) -> None:
    async def scenario() -> None:
        worker = await started_worker(tmp_path)
        jobs = Jobs(worker.run)
        first = jobs.start(job(tmp_path, "a", predict_s=0.6))
        second = jobs.start(job(tmp_path, "b"))
        await asyncio.sleep(0)  # both sent
        if when == "once_prepared":  # b waits, decoded, for the GPU
            await jobs.started["a"].wait()
            await asyncio.sleep(0.35)
        worker.cancel("b")
        a, b = await first, await second
        await worker.stop()

        assert (a.error, a.outputs, a.canceled) == (None, ["out.txt"], False)
        assert (b.canceled, b.started_at, b.outputs) == (True, None, [])
        assert ("started", "b") not in jobs.events
        assert jobs.events.index(("done", "b")) < jobs.events.index(("done", "a")), "at once"

    run_async(scenario())


@pytest.mark.parametrize("how", ["sigkill", "engine_kill", "crash_in_predict"])
def test_a_crash_fails_the_running_job_and_hands_back_the_waiting_one(
    tmp_path: Path, how: str
) -> None:
    async def scenario() -> None:
        engine = WorkerEngine(PREDICTOR, config(tmp_path), Metrics("test", lambda: 0.0))
        assert await engine.wait_ready()
        jobs = Jobs(engine.run)
        crash = {"fail": "crash"} if how == "crash_in_predict" else {"predict_s": 30}
        first, second = jobs.start(job(tmp_path, "a", **crash)), jobs.start(job(tmp_path, "b"))
        await jobs.started["a"].wait()
        if how != "crash_in_predict":  # a still runs
            engine.kill("not-in-this-worker")  # no-op: the worker does not hold that job
            assert engine.readiness == (True, "ready")
        if how == "sigkill":
            os.kill(engine.info["pid"], signal.SIGKILL)
        elif how == "engine_kill":
            engine.kill("a")
        with pytest.raises(WorkerCrashed, match="signal 9.*Retry the job"):
            await first
        b = await second
        await engine.stop(abandon_running=False)

        assert b == JobDone("b", not_started=True)
        assert jobs.events == [("started", "a"), ("crashed", "a"), ("done", "b")]

    run_async(scenario())


def test_errors_in_prepare_and_finish_fail_only_their_job(tmp_path: Path) -> None:
    async def scenario() -> None:
        worker = await started_worker(tmp_path)
        jobs = Jobs(worker.run)
        tasks = [
            jobs.start(job(tmp_path, "bad-input", fail="prepare")),
            jobs.start(job(tmp_path, "bad-disk", fail="finish")),
            jobs.start(job(tmp_path, "ok")),
        ]
        bad_input, bad_disk, ok = [await task for task in tasks]
        assert worker.state is WorkerState.READY
        await worker.stop()

        assert bad_input.error == {
            "code": "model_error",
            "message": "the model failed: ValueError: cannot decode the input file",
            "exception": "ValueError",
        }
        assert (bad_input.started_at, bad_input.outputs) == (None, [])
        assert bad_disk.error == {
            "code": "model_error",
            "message": "the model failed: OSError: no space left on device",
            "exception": "OSError",
        }
        assert None not in (bad_disk.started_at, bad_disk.ended_at)  # it had started
        assert (ok.error, ok.outputs) == (None, ["out.txt"])
        assert ("started", "bad-input") not in jobs.events

    run_async(scenario())


def test_shutdown_writes_the_finished_job_and_hands_back_the_waiting_one(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        worker = await started_worker(tmp_path)
        jobs = Jobs(worker.run)
        first = jobs.start(job(tmp_path, "a", finish_s=0.6))
        second = jobs.start(job(tmp_path, "b", prepare_s=1.0))
        await jobs.started["a"].wait()
        await asyncio.sleep(0.3)  # a is being written, b being prepared
        await worker.stop()
        a, b = await first, await second

        assert (a.error, a.outputs) == (None, ["out.txt"])
        assert (tmp_path / "a" / "out.txt").is_file()
        assert b == JobDone("b", not_started=True)
        assert worker.state is WorkerState.DEAD

    run_async(scenario())
