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


ToWorker = RunJob | CancelJob | Shutdown
FromWorker = WorkerReady | WorkerSetupFailed | JobProgress | JobDone
