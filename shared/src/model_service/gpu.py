"""GPU facts from NVML (nvidia-ml-py), without torch: presence, memory, capability."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pynvml


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]

    @property
    def total_gb(self) -> float:
        return self.total_bytes / 1e9

    @property
    def free_gb(self) -> float:
        return self.free_bytes / 1e9


def probe() -> list[GpuInfo]:
    """Every visible NVIDIA GPU; empty when there is none or no driver."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(
                GpuInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                )
            )
        return found
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def unmet_requirement(min_vram_gb: float, gpus: list[GpuInfo]) -> str | None:
    """Why this machine cannot run the service's full model, or None if it can."""
    if min_vram_gb <= 0:
        return None
    if not gpus:
        return (
            f"no NVIDIA GPU found (this service needs one with at least {min_vram_gb:g} GB); "
            "run with PROFILE=tiny to try it on CPU"
        )
    best = max(gpus, key=lambda info: info.total_bytes)
    if best.total_gb < min_vram_gb:
        return (
            f"GPU {best.name} has {best.total_gb:.1f} GB; this service needs at least "
            f"{min_vram_gb:g} GB"
        )
    return None


@functools.cache
def present() -> bool:
    """Whether this machine has an NVIDIA GPU (asked once: a GPU does not come later)."""
    return bool(probe())


def used_bytes() -> int | None:
    """GPU memory in use (NVML: by every process, cached allocations included) on the
    busiest GPU; None without a GPU."""
    gpus = probe() if present() else []
    return max(info.total_bytes - info.free_bytes for info in gpus) if gpus else None


class PeakMemory:
    """The most GPU memory in use while a job runs somewhere we cannot ask (a ComfyUI
    prompt): `used_bytes` read every `every_s` from `begin()` to `stop()`, off the
    event loop. Nothing is read on a machine without a GPU."""

    def __init__(self, read: Callable[[], int | None] | None = used_bytes, every_s: float = 0.25):
        self._read = read  # None: nothing to read (no GPU)
        self._every_s = every_s
        self._began = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.peak: int | None = None

    @classmethod
    def here(cls) -> PeakMemory:
        """For this machine: one that reads nothing without a GPU."""
        return cls(used_bytes if present() else None)

    def start(self) -> None:
        if self._read is not None:
            self._task = asyncio.get_running_loop().create_task(self._sample())

    def begin(self) -> None:
        """The job's work began (its prompt started): count from now."""
        self._began.set()

    async def stop(self) -> float | None:
        """Ends the sampling; the peak in GiB (2 decimals), or None (no GPU, or the job
        never began)."""
        if self._task is not None:
            if self._began.is_set():
                await self._take()  # its last moment too
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return None if self.peak is None else round(self.peak / 2**30, 2)

    async def _sample(self) -> None:
        await self._began.wait()
        while True:
            if not await self._take():
                return
            await asyncio.sleep(self._every_s)

    async def _take(self) -> bool:
        if self._read is None:
            return False
        used = await asyncio.to_thread(self._read)
        if used is None:
            return False  # no GPU: nothing to sample
        self.peak = used if self.peak is None else max(self.peak, used)
        return True
