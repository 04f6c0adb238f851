"""GPU requirement checks (NVML facts, no torch)."""

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
