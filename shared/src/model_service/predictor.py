"""What a service implements to run its model in the worker process.

A predictor is loaded by import path (`package.module:ClassName`) inside a spawned
child process, so nothing here, nor the module that defines it, is imported by the API
process. `setup` runs once per worker (load the model); `predict` runs once per job.

The worker runs jobs as a pipeline so that the GPU never waits for CPU work: the next
job's optional `prepare` (decode the inputs) runs while the current job's `predict` runs,
and a `PredictResult.finish` (encode and write the outputs) runs once `predict` returned,
while the next job's `predict` already runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
    job_log_lines: int = 500  # JOB_LOG_LINES
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
    # writes the outputs named in `outputs`; run by the worker's output thread once the
    # GPU is free for the next job. None: `predict` wrote them itself.
    finish: Callable[[], None] | None = None


@dataclass
class SetupResult:
    """What the loaded model wants the service to say about itself (`/v1/service`)."""

    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # plain JSON values only: a library's own type (torch's `__version__` is a
        # TorchVersion) would import that library in the API process when unpickled
        self.info = json.loads(json.dumps(self.info, default=str))


class Predictor(Protocol):
    """`setup` and `predict`, and optionally
    `prepare(self, inputs: dict[str, Any]) -> dict[str, Any]`: the job's CPU work before
    the GPU (open and decode the input files), run on another thread while the previous
    job's `predict` runs; `predict` then gets what it returned. It must not use the GPU;
    an exception fails the job like one from `predict`. Not declared here, so that a
    predictor without it still is a `Predictor`: call it through `prepare_inputs`."""

    def setup(self, config: WorkerConfig) -> SetupResult:
        """Load the model once. Raise to fail readiness with the exception's message."""

    def predict(self, inputs: dict[str, Any], ctx: JobContext) -> PredictResult:
        """Run one job. `inputs` is the validated input with media fields replaced by
        local file paths."""


def prepare_inputs(predictor: Predictor, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` through the predictor's optional `prepare` (unchanged without one)."""
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = getattr(predictor, "prepare", None)
    return inputs if prepare is None else prepare(inputs)


def predict_now(predictor: Predictor, inputs: dict[str, Any], ctx: JobContext) -> PredictResult:
    """One job in one call on this thread: `prepare` (if any), `predict`, `finish` (if
    any). For tests and benches; the worker runs the three as a pipeline."""
    result = predictor.predict(prepare_inputs(predictor, inputs), ctx)
    if result.finish is not None:
        result.finish()
    return result
