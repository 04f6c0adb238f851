"""ComfyUI backend: our protocol client, its errors, and a stand-in server for tests."""

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
