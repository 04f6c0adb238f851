"""Errors of the ComfyUI backend, mapped onto the one hierarchy in `model_service.errors`.

Each keeps what ComfyUI said (node id, class type, exception type, the input at fault)
in its details, so a failed job says which node failed and why.
"""

from __future__ import annotations

from model_service.errors import (
    CudaError,
    InvalidInput,
    JobCanceled,
    JobFailure,
    JobTimeout,
    ModelError,
    OutOfMemory,
    ServiceError,
)


class ComfyValidationError(InvalidInput):
    """ComfyUI refused the workflow (`POST /prompt` answered 400, or 200 with node errors)."""

    code = "workflow_invalid"


class ComfyExecutionError(ModelError):
    """A node raised while the prompt ran (`execution_error`)."""

    code = "comfy_execution_error"


class ComfyOutOfMemory(OutOfMemory):
    """A node ran out of GPU memory; we asked ComfyUI to unload its models (`POST /free`)."""


class ComfyCudaError(CudaError):
    """A CUDA fault other than out-of-memory: the ComfyUI process should be restarted."""


class ComfyUnavailable(ServiceError):
    """ComfyUI does not answer (not started yet, or gone)."""

    code = "backend_unavailable"
    status_code = 503


class ComfyCrashed(JobFailure):
    """ComfyUI died or restarted while our prompt was queued or running."""

    code = "backend_crashed"


class ComfyTimeout(JobTimeout):
    """Our prompt ran past its time limit; it was interrupted."""


class ComfyOutputMissing(JobFailure):
    """ComfyUI listed an output file that it cannot serve."""

    code = "output_missing"


class ComfyInterrupted(JobCanceled):
    """Our prompt was interrupted or removed from the queue (a cancel), not a failure."""

    def __init__(self, prompt_id: str, node_id: str | None = None) -> None:
        where = f" at node {node_id}" if node_id else ""
        super().__init__(f"ComfyUI prompt {prompt_id} was interrupted{where}")
        self.prompt_id = prompt_id
        self.node_id = node_id
