"""ComfyUI backend: our protocol client and its errors (the stand-in ComfyUI for tests is in
the `model-service-testing` package, never in an image)."""

from model_service.comfy.client import ComfyClient, ComfyProgress, OutputFile, RunResult
from model_service.comfy.errors import (
    ComfyCrashed,
    ComfyCudaError,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyOutOfMemory,
    ComfyOutputMissing,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
)

__all__ = [
    "ComfyClient",
    "ComfyCrashed",
    "ComfyCudaError",
    "ComfyExecutionError",
    "ComfyInterrupted",
    "ComfyOutOfMemory",
    "ComfyOutputMissing",
    "ComfyProgress",
    "ComfyTimeout",
    "ComfyUnavailable",
    "ComfyValidationError",
    "OutputFile",
    "RunResult",
]
