"""A job's peak GPU memory: counted from the start of `predict` where torch runs CUDA,
nothing on a CPU, and no torch import of its own."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from model_service.worker import gpu_peak


class FakeCuda:
    def __init__(self) -> None:
        self.peak = 0
        self.resets = 0

    def is_available(self) -> bool:
        return True

    def reset_peak_memory_stats(self) -> None:
        self.resets += 1
        self.peak = 0

    def max_memory_allocated(self) -> int:
        return self.peak


def test_peak_is_counted_from_the_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    cuda.peak = 40 * gpu_peak.GIB  # an earlier job's
    gpu_peak.reset()
    assert cuda.resets == 1
    cuda.peak = int(17.256 * gpu_peak.GIB)
    assert gpu_peak.peak_gb() == 17.26


def test_no_figure_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.is_available = lambda: False  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    gpu_peak.reset()
    assert cuda.resets == 0
    assert gpu_peak.peak_gb() is None


def test_it_imports_no_torch() -> None:
    code = (
        "import sys; from model_service.worker import gpu_peak; gpu_peak.reset(); "
        "assert gpu_peak.peak_gb() is None; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
