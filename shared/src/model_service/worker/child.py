"""Entry point of the worker process: load the predictor once, then run jobs one by one.

The main thread runs the model; a reader thread takes messages from the pipe so that a
cancel reaches the job while it runs (the predictor sees it at its next
`ctx.progress`). Nothing here imports torch; the predictor's module may.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from model_service.errors import CudaError, JobCanceled, ModelError, OutOfMemory, ServiceError
from model_service.logs import configure_logging, get_logger
from model_service.predictor import Predictor, WorkerConfig
from model_service.worker.protocol import (
    CancelJob,
    FromWorker,
    JobDone,
    JobProgress,
    RunJob,
    Shutdown,
    WorkerReady,
    WorkerSetupFailed,
)

log = get_logger("model_service.worker")


class _Pipe:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: FromWorker) -> None:
        with self._lock:
            self._conn.send(message)


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
    """Reader thread: queues jobs, flags cancels (which may arrive before the job)."""

    def __init__(self, conn: Connection) -> None:
        self.jobs: queue.Queue[RunJob | None] = queue.Queue()
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._conn = conn
        threading.Thread(target=self._read, name="worker-inbox", daemon=True).start()

    def cancel_flag(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._cancels.setdefault(job_id, threading.Event())

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._cancels.pop(job_id, None)

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = Shutdown()  # the API process is gone: stop
            if isinstance(message, RunJob):
                self.jobs.put(message)
            elif isinstance(message, CancelJob):
                self.cancel_flag(message.job_id).set()
            elif isinstance(message, Shutdown):
                self.jobs.put(None)
                return


def load_predictor(path: str) -> Predictor:
    module_name, _, class_name = path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    predictor: Predictor = cls()
    return predictor


def worker_main(conn: Connection, predictor_path: str, config: WorkerConfig) -> None:
    configure_logging(config.log_level, config.log_format)
    if config.threads is not None:  # before the predictor imports torch, which reads these
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(config.threads)
    pipe = _Pipe(conn)
    inbox = _Inbox(conn)
    try:
        predictor = load_predictor(predictor_path)
        result = predictor.setup(config)
    except Exception as exc:  # any setup failure becomes a readiness reason
        log.exception("worker setup failed")
        pipe.send(WorkerSetupFailed(f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(WorkerReady(result.info))
    log.info("worker ready", **result.info)
    while (run := inbox.jobs.get()) is not None:
        done = _run_one(predictor, run, inbox, pipe)
        pipe.send(done)
        if done.fatal:
            log.error("worker exiting after a fatal error", job_id=run.job_id)
            return


def _run_one(predictor: Predictor, run: RunJob, inbox: _Inbox, pipe: _Pipe) -> JobDone:
    ctx = _JobContext(run, inbox.cancel_flag(run.job_id), pipe)
    with structlog.contextvars.bound_contextvars(job_id=run.job_id):
        try:
            ctx.check_canceled()
            Path(run.output_dir).mkdir(parents=True, exist_ok=True)
            result = predictor.predict(run.inputs, ctx)
            return JobDone(run.job_id, outputs=result.outputs, info=result.info)
        except JobCanceled:
            log.info("job canceled at a step boundary")
            return JobDone(run.job_id, canceled=True)
        except Exception as exc:
            error = classify_exception(exc)
            log.error("job failed", error=error.to_dict(), traceback=traceback.format_exc())
            return JobDone(run.job_id, error=error.to_dict(), fatal=isinstance(error, CudaError))
        finally:
            inbox.forget(run.job_id)


def classify_exception(exc: Exception) -> ServiceError:
    """Map an exception from model code to a job error with a code and advice."""
    if isinstance(exc, ServiceError):
        return exc
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
