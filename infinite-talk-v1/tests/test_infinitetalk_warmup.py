"""Warm start (WARMUP=1) of the InfiniteTalk service: its warm-up (a generated face and
0.2 s of a tone: one 5-frame window) is a prompt ComfyUI accepts, and the first job
after it takes every loader from ComfyUI's cache."""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path

import httpx

from infinitetalk.service import MANIFEST
from model_service.provision import Manifest
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import data_uri, png_data_uri
from model_service_testing.process import start_warming, watch_ready
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

# the diffusion model, its LoRA, the InfiniteTalk patch, wav2vec2, UMT5, the VAE
LOADERS = ("1", "2", "3", "4", "7", "10")


def _wav(seconds: float) -> bytes:
    rate = 16000
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        samples = (int(8000 * math.sin(i / 10)) for i in range(int(rate * seconds)))
        out.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
    return buffer.getvalue()


def test_warm_up_runs_and_the_first_job_finds_the_models_loaded(
    comfy_standin: StartStandin, tmp_path: Path
) -> None:
    standin = comfy_standin()
    files = Manifest.load(MANIFEST).files
    models = standin.base_dir / "models"
    service = start_warming("infinite-talk-v1", standin.url, models, tmp_path / "data", files)
    try:
        ready = watch_ready(service)[-1]
        assert "warming up" in [stage["stage"] for stage in ready["stages"]]
        assert "warm-up done" in service.log()
        (warm,) = standin.stats()["prompts"]
        assert warm["12"]["inputs"]["length"] == 5  # one window of 5 frames
        assert warm["5"]["inputs"]["audio"].startswith("jobs/warmup-")
        with service.client() as client:
            body = {
                "input": {
                    "image": png_data_uri(),
                    "audio": data_uri(_wav(0.5), "audio/wav"),
                    "width": 64,
                    "height": 64,
                    "steps": 2,
                    "seed": 1,
                }
            }
            job = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"}).json()
        assert job["status"] == "succeeded", job.get("error")
        ran = job["info"]["comfy_prompt_id"]
        cached = next(nodes for prompt, nodes in standin.stats()["cached"] if prompt == ran)
        assert set(LOADERS) <= set(cached)
    finally:
        service.stop()


@needs_real_comfyui
def test_tiny_warm_up_on_a_real_comfyui(tiny_comfy_service: StartComfyService) -> None:
    service = tiny_comfy_service("infinite-talk-v1", env={"WARMUP": "1"})
    assert "warm-up done" in service.log()
    stages = [stage["stage"] for stage in httpx.get(service.url + "/ready").json()["stages"]]
    assert "warming up" in stages
