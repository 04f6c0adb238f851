"""GPU facts from NVML (nvidia-ml-py), without torch: presence, memory, capability."""

from __future__ import annotations

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
