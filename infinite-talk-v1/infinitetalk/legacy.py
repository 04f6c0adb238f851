"""The original InfiniteTalk wrapper's `POST /generate` body, mapped onto InfiniteTalkInput."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class GenerateRequest(BaseModel):
    """As the original `api_wrapper.py` took it. Its `cfg`, `shift`, `scheduler`,
    `negative_prompt` and `max_frames` have no counterpart here (cfg 1 with the lightx2v
    LoRA; the length follows the audio, up to MAX_AUDIO_S); `fps` is always 25."""

    model_config = ConfigDict(extra="ignore")

    image_url: str
    audio_url: str
    prompt: str = "The video shows a young man singing a song."
    seed: int | None = 2
    steps: int = 6
    width: int | None = None
    height: int | None = None


def to_input(body: GenerateRequest) -> dict[str, Any]:
    size = {}
    if body.width is not None and body.height is not None:  # the original's 450x800: to x16
        size = {"width": body.width // 16 * 16, "height": body.height // 16 * 16}
    return {
        "image": body.image_url,
        "audio": body.audio_url,
        "prompt": body.prompt,
        "seed": body.seed,
        "steps": body.steps,
        **size,
    }
