"""What a service implements to run its model in the worker process.

A predictor is loaded by import path (`package.module:ClassName`) inside a spawned
child process, so nothing here, nor the module that defines it, is imported by the API
process. `setup` runs once per worker (load the model); `predict` runs once per job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class WorkerConfig:
    """What the API process tells a new worker (plain data: it crosses a process)."""

    profile: str
    models_dir: Path
    data_dir: Path
    log_level: str = "INFO"
    log_format: str = "json"
    threads: int | None = None  # OMP_NUM_THREADS for the model; None: the library default
    options: dict[str, Any] = field(default_factory=dict)


class JobContext(Protocol):
    """Handed to `predict`: where to write, how to report progress, whether to stop."""

    job_id: str
    output_dir: Path
    seed: int

    def progress(self, step: int, total: int) -> None:
        """Report progress. Raises `JobCanceled` when the job was canceled: call it at
        every step so that cancel and timeout stop the job at the next step."""

    def check_canceled(self) -> None:
        """Raise `JobCanceled` if the job was canceled."""


@dataclass
class PredictResult:
    """Files written under `ctx.output_dir` (names only) and facts to record on the job."""

    outputs: list[str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SetupResult:
    """What the loaded model wants the service to say about itself (`/v1/service`)."""

    info: dict[str, Any] = field(default_factory=dict)


class Predictor(Protocol):
    def setup(self, config: WorkerConfig) -> SetupResult:
        """Load the model once. Raise to fail readiness with the exception's message."""

    def predict(self, inputs: dict[str, Any], ctx: JobContext) -> PredictResult:
        """Run one job. `inputs` is the validated input with media fields replaced by
        local file paths."""
