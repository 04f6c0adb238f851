"""Typed messages between the API process and a worker process (pickled over a pipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --- API -> worker -----------------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    job_id: str
    inputs: dict[str, Any]
    output_dir: str
    seed: int


@dataclass(frozen=True)
class CancelJob:
    job_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# --- worker -> API -----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    info: dict[str, Any]


@dataclass(frozen=True)
class WorkerSetupFailed:
    message: str


@dataclass(frozen=True)
class JobStarted:
    """The job's GPU work began (its inputs were prepared while the previous job ran)."""

    job_id: str
    at: float  # epoch seconds


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    step: int
    total: int


@dataclass(frozen=True)
class JobDone:
    job_id: str
    outputs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # {"code", "message", ...} when the job failed
    canceled: bool = False
    fatal: bool = False  # the worker exits after this message (poisoned CUDA context)
    # the engine lost the job before it began (its backend died or stopped under the job
    # before it): not the job's fault, so the runner queues it again without counting it
    not_started: bool = False
    # when the engine really ran it (epoch seconds): the gap and busy metrics, `job.info`
    started_at: float | None = None
    ended_at: float | None = None
    log: list[str] = field(default_factory=list)  # the job's lines in the worker (job_logs)


ToWorker = RunJob | CancelJob | Shutdown
FromWorker = WorkerReady | WorkerSetupFailed | JobStarted | JobProgress | JobDone
