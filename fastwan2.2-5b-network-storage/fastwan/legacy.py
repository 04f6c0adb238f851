"""The original FastWan wrapper's `POST /generate` body, mapped onto FastWanInput."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class GenerateRequest(BaseModel):
    """As the original `api_wrapper.py` took it (its defaults kept). `steps` is accepted
    and ignored: the distilled model always runs its own 3 steps (the original's 8 were
    for the base model plus the FastWan LoRA)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int = 3  # ignored (see above)
    cfg: float = 1.0
    width: int = 1280
    height: int = 704
    length: int = 121
    fps: int = 24
    image_url: str | None = None  # not in the original: image-to-video


def to_input(body: GenerateRequest) -> dict[str, Any]:
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or "",
        "seed": body.seed,
        "cfg": body.cfg,
        "width": body.width,
        "height": body.height,
        "num_frames": body.length,
        "fps": body.fps,
        "start_image": body.image_url,
    }
