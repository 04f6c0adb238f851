"""The original Wan2.2-14B wrapper's `POST /generate` body, mapped onto Wan14bInput."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class GenerateRequest(BaseModel):
    """As the original `api_wrapper.py` took it (image-to-video). Its two cfg values map
    onto the one cfg both experts share here (the high-noise one is used); its 6 steps
    become the 4 the lightx2v LoRAs are made for, unless given."""

    model_config = ConfigDict(extra="ignore")

    image_url: str
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = 1
    steps: int | None = None
    cfg_high_noise: float | None = None
    cfg_low_noise: float | None = None
    width: int = 640
    height: int = 640
    frames: int = 81
    fps: int = 16


def to_input(body: GenerateRequest) -> dict[str, Any]:
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,  # absent: Wan's standard one
        "start_image": body.image_url,
        "seed": body.seed,
        "steps": body.steps,
        "cfg": body.cfg_high_noise,
        "width": body.width,
        "height": body.height,
        "num_frames": body.frames,
        "fps": body.fps,
    }
