"""Warm start (WARMUP=1) of the Wan2.2-14B service: its warm-up is an image-to-video
prompt (a generated start image uploaded like a job's) that ComfyUI accepts, and the
first i2v job after it takes both experts' loaders from ComfyUI's cache."""

from __future__ import annotations

from pathlib import Path

import httpx

from model_service.provision import Manifest
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import png_data_uri
from model_service_testing.process import start_warming, watch_ready
from model_service_testing.pytest_plugin import StartComfyService, StartStandin
from wan14b.service import MANIFEST

LOADERS = ("1", "2", "3", "4", "7", "10")  # both experts, their LoRAs, UMT5, the VAE
JOB = {"prompt": "a boat", "width": 64, "height": 64, "num_frames": 9, "fps": 8, "seed": 3}


def test_warm_up_runs_i2v_and_the_first_job_finds_the_models_loaded(
    comfy_standin: StartStandin, tmp_path: Path
) -> None:
    standin = comfy_standin()
    files = Manifest.load(MANIFEST).files
    models = standin.base_dir / "models"
    service = start_warming("wan2.2-14b-loras-v1", standin.url, models, tmp_path / "data", files)
    try:
        ready = watch_ready(service)[-1]
        assert "warming up" in [stage["stage"] for stage in ready["stages"]]
        assert "warm-up done" in service.log()
        (warm,) = standin.stats()["prompts"]
        assert warm["11"]["class_type"] == "LoadImage"  # image-to-video, its image uploaded
        assert warm["11"]["inputs"]["image"].startswith("jobs/warmup-")
        assert (warm["13"]["inputs"]["steps"], warm["13"]["inputs"]["end_at_step"]) == (2, 1)
        with service.client() as client:
            body = {"input": {**JOB, "start_image": png_data_uri()}}
            job = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"}).json()
        assert job["status"] == "succeeded", job.get("error")
        ran = job["info"]["comfy_prompt_id"]
        cached = next(nodes for prompt, nodes in standin.stats()["cached"] if prompt == ran)
        assert set(LOADERS) <= set(cached)
    finally:
        service.stop()


@needs_real_comfyui
def test_tiny_warm_up_on_a_real_comfyui(tiny_comfy_service: StartComfyService) -> None:
    service = tiny_comfy_service("wan2.2-14b-loras-v1", env={"WARMUP": "1"})
    assert "warm-up done" in service.log()
    stages = [stage["stage"] for stage in httpx.get(service.url + "/ready").json()["stages"]]
    assert "warming up" in stages
