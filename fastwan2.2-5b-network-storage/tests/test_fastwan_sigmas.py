"""The σ every model call receives, recorded inside a real ComfyUI (COMFYUI_TEST_DIR) running
the service's own graph on tiny weights: FastVideo's 3-step DMD schedule, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import png_data_uri
from model_service_testing.process import ServiceProcess
from model_service_testing.pytest_plugin import ProbedService
from model_service_testing.sigma_probe import SigmaLog

# FastVideo's DMD denoising timesteps 1000, 757, 522 (σ = t / 1000), each from fresh noise
DMD_SIGMAS = [1.0, 0.757, 0.522]


@pytest.fixture(scope="module")
def probed(start_probed_service: Callable[[str], ProbedService]) -> ProbedService:
    return start_probed_service("fastwan2.2-5b-packed")


@needs_real_comfyui
@pytest.mark.parametrize("start_image", [False, True], ids=["t2v", "i2v"])
def test_each_model_call_gets_the_dmd_sigmas(
    probed: tuple[ServiceProcess, SigmaLog], start_image: bool
) -> None:
    service, log = probed
    payload = {"prompt": "a red fox", "seed": 1, "width": 64, "height": 64, "num_frames": 9}
    if start_image:
        payload["start_image"] = png_data_uri()
    log.clear()
    with service.client() as http:
        job = http.post("/v1/jobs", json={"input": payload}, headers={"Prefer": "wait=120"})
        assert job.json()["status"] == "succeeded", job.text
    assert log.sigmas() == pytest.approx(DMD_SIGMAS, abs=1e-6)
