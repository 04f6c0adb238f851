"""GPU requirement checks (NVML facts, no torch)."""

import asyncio

from model_service import gpu

H100 = gpu.GpuInfo(0, "NVIDIA H100 80GB HBM3", 85_000_000_000, 84_000_000_000, (9, 0))
T4 = gpu.GpuInfo(0, "Tesla T4", 16_000_000_000, 15_000_000_000, (7, 5))


def test_no_gpu_means_a_reason_that_points_to_the_tiny_profile() -> None:
    reason = gpu.unmet_requirement(8, [])
    assert reason is not None
    assert "no NVIDIA GPU" in reason
    assert "PROFILE=tiny" in reason


def test_too_little_vram_is_named() -> None:
    reason = gpu.unmet_requirement(24, [T4])
    assert reason == "GPU Tesla T4 has 16.0 GB; this service needs at least 24 GB"
    assert gpu.unmet_requirement(24, [T4, H100]) is None
    assert gpu.unmet_requirement(0, []) is None


def test_probe_answers_without_torch_with_or_without_a_driver() -> None:
    found = gpu.probe()  # [] on a machine without an NVIDIA driver
    assert all(info.total_bytes >= info.free_bytes > 0 for info in found)


def test_peak_memory_samples_from_the_jobs_start_to_its_end() -> None:
    """Issue 27: a ComfyUI job's peak GPU memory, sampled (NVML) while its prompt runs;
    nothing before it began (the job ahead's use is not its own)."""
    readings = iter([5 * 2**30, 7 * 2**30, 6 * 2**30])
    calls: list[str] = []

    def read() -> int | None:
        calls.append("read")
        return next(readings, 6 * 2**30)

    async def job() -> tuple[float | None, int]:
        memory = gpu.PeakMemory(read, every_s=0.01)
        memory.start()
        await asyncio.sleep(0.05)  # waiting behind another job: nothing read
        before = len(calls)
        memory.begin()
        await asyncio.sleep(0.05)
        return await memory.stop(), before

    peak, before = asyncio.run(job())
    assert before == 0
    assert peak == 7.0
    assert len(calls) >= 3


def test_peak_memory_is_none_without_a_gpu_or_a_start() -> None:
    async def run(begin: bool) -> float | None:
        memory = gpu.PeakMemory(lambda: None, every_s=0.01)
        memory.start()
        if begin:
            memory.begin()
        await asyncio.sleep(0.03)
        return await memory.stop()

    assert asyncio.run(run(True)) is None
    assert asyncio.run(run(False)) is None
