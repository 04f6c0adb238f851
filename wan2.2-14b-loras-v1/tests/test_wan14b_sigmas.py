"""The σ every model call receives, recorded inside a real ComfyUI (COMFYUI_TEST_DIR) running
the service's graphs on tiny weights: the Lightning training timesteps with the 4-step
LoRAs, ComfyUI's `simple` schedule at the template's shift without them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from model_service_testing.comfy_sigmas import schedule
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import png_data_uri
from model_service_testing.process import ServiceProcess
from model_service_testing.pytest_plugin import ProbedService
from model_service_testing.sigma_probe import SigmaLog

# Wan2.2-Lightning's 4 training timesteps (linspace(1000, 0, 5) shifted by 5): 1000, 937.5,
# 833.3, 625; the first two on the high-noise expert, the last two on the low-noise one
LIGHTNING_SIGMAS = [1.0, 0.9375, 0.8333333, 0.625]


@pytest.fixture(scope="module")
def probed(start_probed_service: Callable[[str], ProbedService]) -> ProbedService:
    return start_probed_service("wan2.2-14b-loras-v1")


RED, BLUE = png_data_uri((220, 20, 20)), png_data_uri((20, 20, 220))


@needs_real_comfyui
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, LIGHTNING_SIGMAS),
        ({"start_image": RED}, LIGHTNING_SIGMAS),
        ({"start_image": RED, "lightning": False}, schedule("simple", 20, 5.0)[:-1]),
        (
            {"start_image": RED, "end_image": BLUE, "lightning": False},
            schedule("simple", 20, 8.0)[:-1],  # the flf2v template's shift 8
        ),
    ],
    ids=["t2v", "i2v", "i2v-full", "flf-full"],
)
def test_each_model_call_gets_the_intended_sigma(
    probed: tuple[ServiceProcess, SigmaLog], extra: dict[str, Any], expected: list[float]
) -> None:
    service, log = probed
    payload = {"prompt": "a fox", "seed": 5, "width": 64, "height": 64, "num_frames": 5, **extra}
    log.clear()
    with service.client() as http:
        job = http.post("/v1/jobs", json={"input": payload}, headers={"Prefer": "wait=300"})
        assert job.json()["status"] == "succeeded", job.text
    assert log.sigmas() == pytest.approx(expected, abs=1e-6)
