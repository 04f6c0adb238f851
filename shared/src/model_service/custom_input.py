"""Custom inputs as the HTTP layer and the submitter see them: a job whose input brings
its own graph (`{"workflow": ..., "files": ...}`) instead of the service's typed input.
Only an engine that runs such graphs takes them (a ComfyUI service with
ALLOW_CUSTOM_WORKFLOWS: its spec's `custom_input`, `model_service.comfy.custom`); every
other service answers `off_error`."""

from __future__ import annotations

from typing import Any

from model_service.errors import InvalidInput

FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a custom input's file name


def is_custom(raw_input: Any) -> bool:
    """A job's input that brings a workflow (not the service's typed input)."""
    return isinstance(raw_input, dict) and "workflow" in raw_input


def off_error() -> InvalidInput:
    return InvalidInput(
        "input.workflow: custom ComfyUI workflows are off on this service; they run on the "
        "ComfyUI services started with ALLOW_CUSTOM_WORKFLOWS=1 (read the README's security "
        "note first). Send the service's own input instead (GET /docs)",
        field="input.workflow",
    )


def images_error() -> InvalidInput:
    """A custom input with worker-comfyui's `images` list: say where it goes instead."""
    return InvalidInput(
        "input.images: worker-comfyui's `images` list is not taken here; give the graph's "
        'input files as `files` ({"x.png": "data:image/png;base64,..." | https URL | upload '
        "id}), or send the worker-comfyui request unchanged to POST "
        "/v1/compat/worker-comfyui/runsync (serverless: as the job's input, without `files`)",
        field="input.images",
    )
