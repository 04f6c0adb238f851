"""What a test machine may lack, and the only reasons a test may skip for.

A test skips only for what the machine genuinely lacks: a GPU, a real ComfyUI checkout
(`COMFYUI_TEST_DIR`, or `COMFYUI_TEST_URL` for a running one), or the right to mount a
small filesystem (root: the disk-full tests). When a real ComfyUI is
under test, the few tests that need the stand-in's fault knobs skip instead. Every other
skip (a missing file, tool or package of the project) is a defect: `pytest
--only-machine-skips` (what `make test` runs) fails the run when one appears.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

COMFYUI_TEST_DIR = os.environ.get("COMFYUI_TEST_DIR") or None
COMFYUI_TEST_URL = (os.environ.get("COMFYUI_TEST_URL") or "").rstrip("/") or None

NO_GPU = "no GPU"
NO_REAL_COMFYUI = "no real ComfyUI"
REAL_COMFYUI_UNDER_TEST = "a real ComfyUI is under test"
NO_MOUNT = "cannot mount a tmpfs"
MACHINE_SKIPS = (NO_GPU, NO_REAL_COMFYUI, REAL_COMFYUI_UNDER_TEST, NO_MOUNT)

WHY_NO_REAL_COMFYUI = (
    f"{NO_REAL_COMFYUI}: set COMFYUI_TEST_DIR to a ComfyUI 0.33.0 checkout "
    "(COMFYUI_TEST_PYTHON: its interpreter) to run the real workflows on tiny weights"
)
needs_real_comfyui = pytest.mark.skipif(COMFYUI_TEST_DIR is None, reason=WHY_NO_REAL_COMFYUI)


def skip_without_real_comfyui_url() -> str:
    """The running real ComfyUI (`COMFYUI_TEST_URL`) a contract test runs against."""
    if COMFYUI_TEST_URL is None:
        pytest.skip(f"{NO_REAL_COMFYUI}: set COMFYUI_TEST_URL to a running ComfyUI 0.33.0")
    return COMFYUI_TEST_URL


def skip_on_real_comfyui(why: str) -> NoReturn:
    """A stand-in-only test (fault knobs, timing knobs) meets a real ComfyUI."""
    pytest.skip(f"{REAL_COMFYUI_UNDER_TEST}: {why}")


def is_machine_skip(reason: str) -> bool:
    return reason.startswith(MACHINE_SKIPS)
