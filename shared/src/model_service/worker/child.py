"""Entry point of the worker process: load the predictor once, then run jobs in order.

Jobs go through a pipeline of threads so that the GPU never waits for CPU work:
- the inbox thread reads the pipe: it queues jobs and takes cancels (which may arrive
  before their job): a job not started yet ends at once, a running one at its next
  `ctx.progress`;
- the prepare thread runs the predictor's optional `prepare` (decode the inputs) of the
  next job while the current one runs;
- the main thread runs `predict` (the GPU work), one job at a time;
- the output thread runs a result's `finish` (encode and write the outputs) while the
  main thread already runs the next job.
Nothing here imports torch; the predictor's module may.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from model_service import disk
from model_service.errors import CudaError, JobCanceled, ModelError, OutOfMemory, ServiceError
from model_service.job_logs import JOB_LOGS
from model_service.logs import configure_logging, get_logger
from model_service.predictor import Predictor, PredictResult, WorkerConfig, prepare_inputs
from model_service.worker import gpu_peak
from model_service.worker.protocol import (
    CancelJob,
    FromWorker,
    JobDone,
    JobProgress,
    JobStarted,
    RunJob,
    Shutdown,
    WorkerReady,
    WorkerSetupFailed,
)

log = get_logger("model_service.worker")


class _Pipe:
    """The way back to the API process, shared by the threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: FromWorker) -> None:
        if isinstance(message, JobDone):  # the job's own lines go back with its end
            message = replace(message, log=JOB_LOGS.take(message.job_id))
        with self._lock:
            try:
                self._conn.send(message)
            except OSError:  # the API process is gone: the inbox sees it too and stops us
                log.warning("cannot report to the API process", message=type(message).__name__)


class _JobContext:
    def __init__(self, run: RunJob, canceled: threading.Event, pipe: _Pipe) -> None:
        self.job_id = run.job_id
        self.output_dir = Path(run.output_dir)
        self.seed = run.seed
        self._canceled = canceled
        self._pipe = pipe

    def progress(self, step: int, total: int) -> None:
        self.check_canceled()
        self._pipe.send(JobProgress(self.job_id, step, total))

    def check_canceled(self) -> None:
        if self._canceled.is_set():
            raise JobCanceled(self.job_id)


class _Inbox:
    """Reader thread: queues jobs and takes cancels. A job waits (queued, being prepared
    or ready) until a stage `claim`s it to start or end it; a cancel ends a waiting job
    at once (from here) and flags a started one (its next `ctx.progress` raises)."""

    def __init__(self, conn: Connection, pipe: _Pipe) -> None:
        self.jobs: queue.Queue[RunJob | None] = queue.Queue()  # None: stop
        self.stopping = threading.Event()  # Shutdown came: start no more jobs
        self._cancels: dict[str, threading.Event] = {}  # started jobs, or not received yet
        self._waiting: set[str] = set()  # received, neither started nor ended
        self._lock = threading.Lock()
        self._conn = conn
        self._pipe = pipe
        threading.Thread(target=self._read, name="worker-inbox", daemon=True).start()

    def cancel_flag(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._cancels.setdefault(job_id, threading.Event())

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._cancels.pop(job_id, None)

    def is_waiting(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._waiting

    def claim(self, job_id: str) -> bool:
        """Take a waiting job to start or end it; False when its cancel ended it."""
        with self._lock:
            if job_id not in self._waiting:
                return False
            self._waiting.remove(job_id)
            return True

    def _receive(self, run: RunJob) -> None:
        JOB_LOGS.open(run.job_id)
        with self._lock:
            flag = self._cancels.pop(run.job_id, None)
            canceled = flag is not None and flag.is_set()  # its cancel came first
            if not canceled:
                self._waiting.add(run.job_id)
        if canceled:
            self._end_canceled(run.job_id)
        else:
            self.jobs.put(run)

    def _cancel(self, job_id: str) -> None:
        with self._lock:
            waiting = job_id in self._waiting
            if waiting:
                self._waiting.remove(job_id)
            else:
                self._cancels.setdefault(job_id, threading.Event()).set()
        if waiting:
            self._end_canceled(job_id)

    def _end_canceled(self, job_id: str) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            log.info("job canceled before it started")
        self._pipe.send(JobDone(job_id, canceled=True))

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = Shutdown()  # the API process is gone: stop
            if isinstance(message, RunJob):
                self._receive(message)
            elif isinstance(message, CancelJob):
                self._cancel(message.job_id)
            elif isinstance(message, Shutdown):
                self.stopping.set()
                self.jobs.put(None)
                return


@dataclass
class _Prepared:
    """A job whose inputs are ready for `predict`."""

    run: RunJob
    inputs: dict[str, Any]


@dataclass
class _Predicted:
    """A job whose GPU work is done and whose outputs are still to be written."""

    run: RunJob
    result: PredictResult
    finish: Callable[[], None]
    started_at: float
    ended_at: float


class _Pipeline:
    """The prepare, GPU (the calling thread) and output stages; see the module doc."""

    def __init__(self, predictor: Predictor, inbox: _Inbox, pipe: _Pipe) -> None:
        self._predictor = predictor
        self._inbox = inbox
        self._pipe = pipe
        self._ready: queue.Queue[_Prepared | None] = queue.Queue(maxsize=1)  # None: stop
        self._to_write: queue.Queue[_Predicted | None] = queue.Queue()  # None: stop
        self._fatal = threading.Event()  # a job ended with a poisoned CUDA context
        self._writer = threading.Thread(target=self._write_outputs, name="worker-output")

    def run(self) -> None:
        """Until Shutdown or a fatal error; returns once the outputs of every job whose
        GPU work ended are written and reported."""
        threading.Thread(target=self._prepare_jobs, name="worker-prepare", daemon=True).start()
        self._writer.start()
        try:
            self._run_jobs()
        finally:
            self._drain_outputs()

    # --- prepare thread ----------------------------------------------------------------

    def _prepare_jobs(self) -> None:
        while (run := self._inbox.jobs.get()) is not None:
            if self._inbox.stopping.is_set():
                self._hand_back(run.job_id)
            elif self._inbox.is_waiting(run.job_id):  # else its cancel ended it
                with structlog.contextvars.bound_contextvars(job_id=run.job_id):
                    prepared = self._prepare(run)
                if prepared is not None:
                    self._ready.put(prepared)
        self._ready.put(None)

    def _prepare(self, run: RunJob) -> _Prepared | None:
        """The job ready for the GPU; None when it failed here."""
        try:
            Path(run.output_dir).mkdir(parents=True, exist_ok=True)
            return _Prepared(run, prepare_inputs(self._predictor, run.inputs))
        except Exception as exc:
            if self._inbox.claim(run.job_id):  # else its cancel ended it meanwhile
                self._end(_failed(run.job_id, exc))
            return None

    # --- GPU (main) thread -------------------------------------------------------------

    def _run_jobs(self) -> None:
        while (prepared := self._ready.get()) is not None:
            if self._inbox.stopping.is_set() or self._fatal.is_set():
                self._hand_back(prepared.run.job_id)
                return
            if not self._inbox.claim(prepared.run.job_id):
                continue  # its cancel ended it
            with structlog.contextvars.bound_contextvars(job_id=prepared.run.job_id):
                done = self._predict(prepared)
            if done is None:
                continue  # the output thread ends it
            if done.fatal:  # the jobs before it get their outputs, then the process exits
                self._drain_outputs()
                self._end(done)
                log.error("worker exiting after a fatal error", job_id=done.job_id)
                return
            self._end(done)

    def _predict(self, prepared: _Prepared) -> JobDone | None:
        """Run the job's GPU work; its end, or None once handed to the output thread."""
        run = prepared.run
        canceled = self._inbox.cancel_flag(run.job_id)
        if canceled.is_set():  # canceled just as it was claimed
            log.info("job canceled before it started")
            return JobDone(run.job_id, canceled=True)
        ctx = _JobContext(run, canceled, self._pipe)
        started_at = time.time()
        self._pipe.send(JobStarted(run.job_id, started_at))
        gpu_peak.reset()
        try:
            result = self._predictor.predict(prepared.inputs, ctx)
            peak = gpu_peak.peak_gb()
            if peak is not None:  # in the job's info beside the model's own facts
                result.info["peak_vram_gb"] = peak
        except JobCanceled:
            log.info("job canceled at a step boundary")
            return JobDone(run.job_id, canceled=True, started_at=started_at, ended_at=time.time())
        except Exception as exc:
            return _failed(run.job_id, exc, started_at, time.time())
        ended_at = time.time()
        if result.finish is None:
            return _succeeded(run.job_id, result, started_at, ended_at)
        self._to_write.put(_Predicted(run, result, result.finish, started_at, ended_at))
        return None

    # --- output thread -----------------------------------------------------------------

    def _write_outputs(self) -> None:
        while (predicted := self._to_write.get()) is not None:
            with structlog.contextvars.bound_contextvars(job_id=predicted.run.job_id):
                self._end(self._finish(predicted))

    @staticmethod
    def _finish(predicted: _Predicted) -> JobDone:
        job_id, times = predicted.run.job_id, (predicted.started_at, predicted.ended_at)
        try:
            predicted.finish()
        except Exception as exc:
            return _failed(job_id, exc, *times)
        return _succeeded(job_id, predicted.result, *times)

    def _drain_outputs(self) -> None:
        """Until the output thread wrote and reported everything handed to it."""
        if self._writer.is_alive():
            self._to_write.put(None)
            self._writer.join()

    # --- any thread ----------------------------------------------------------------------

    def _hand_back(self, job_id: str) -> None:
        """A waiting job that will not start here (the worker stops): the API queues it
        again."""
        if self._inbox.claim(job_id):
            self._end(JobDone(job_id, not_started=True))

    def _end(self, done: JobDone) -> None:
        if done.fatal:
            self._fatal.set()  # no job starts after it; the API process kills this one
        self._inbox.forget(done.job_id)
        self._pipe.send(done)


def _succeeded(job_id: str, result: PredictResult, started_at: float, ended_at: float) -> JobDone:
    return JobDone(
        job_id, outputs=result.outputs, info=result.info, started_at=started_at, ended_at=ended_at
    )


def _failed(
    job_id: str, exc: Exception, started_at: float | None = None, ended_at: float | None = None
) -> JobDone:
    error = classify_exception(exc)
    log.error(
        "job failed", error=error.to_dict(), traceback="".join(traceback.format_exception(exc))
    )
    return JobDone(
        job_id,
        error=error.to_dict(),
        fatal=isinstance(error, CudaError),
        started_at=started_at,
        ended_at=ended_at,
    )


def load_predictor(path: str) -> Predictor:
    module_name, _, class_name = path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    predictor: Predictor = cls()
    return predictor


def worker_main(conn: Connection, predictor_path: str, config: WorkerConfig) -> None:
    configure_logging(config.log_level, config.log_format, job_log_lines=config.job_log_lines)
    if config.threads is not None:  # before the predictor imports torch, which reads these
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(config.threads)
    pipe = _Pipe(conn)
    inbox = _Inbox(conn, pipe)
    try:
        predictor = load_predictor(predictor_path)
        result = predictor.setup(config)
    except Exception as exc:  # any setup failure becomes a readiness reason
        log.exception("worker setup failed")
        pipe.send(WorkerSetupFailed(f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(WorkerReady(result.info))
    log.info("worker ready", **result.info)
    _Pipeline(predictor, inbox, pipe).run()


def classify_exception(exc: Exception) -> ServiceError:
    """Map an exception from model code to a job error with a code and advice."""
    if isinstance(exc, ServiceError):
        return exc
    if disk.is_full(exc):  # writing the outputs
        return disk.disk_full("the job's outputs could not be written")
    name = type(exc).__name__
    text = str(exc)
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        _free_gpu_cache()
        return OutOfMemory(
            f"the GPU ran out of memory: {text[:300]}; try a smaller size or fewer images",
            exception=name,
        )
    if name == "AcceleratorError" or "CUDA error" in text:
        return CudaError(
            f"a CUDA error poisoned the worker: {text[:300]}; the worker is being replaced, "
            "retry the job",
            exception=name,
        )
    details: dict[str, Any] = {"exception": name}
    return ModelError(f"the model failed: {name}: {text[:500]}", **details)


def _free_gpu_cache() -> None:
    torch = sys.modules.get("torch")  # only if the model code loaded it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
