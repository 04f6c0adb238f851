"""A job's peak GPU memory, as torch's CUDA allocator counts it (the OurVidz workers
reported it per job). Only where the predictor already imported torch and CUDA is up:
this module imports no torch of its own."""

from __future__ import annotations

import sys
from typing import Any

GIB = 2**30


def _cuda() -> Any:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda


def reset() -> None:
    """Start counting anew: before a job's `predict`."""
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    """The most GPU memory torch held since `reset` (GiB, 2 decimals), or None on CPU."""
    cuda = _cuda()
    if cuda is None:
        return None
    return round(float(cuda.max_memory_allocated()) / GIB, 2)
