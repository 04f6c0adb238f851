"""Typed input of the FastWan2.2-5B services (shown in /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_service.lora_input import LoraSpec, loras_field
from model_service.media_refs import ImageRef
from model_service.video_size import check_frame_count, resolve_size

PRESETS: dict[str, tuple[int, int]] = {"1280x704": (1280, 704), "704x1280": (704, 1280)}
MAX_PIXELS = 1280 * 720  # 720p area: the size the model was trained for
# 5 s at 24 fps: the length FastWan2.2-TI2V-5B was distilled on (its model card, Wan2.2
# TI2V-5B's 121-frame default); longer clips lose coherence. Longer videos: POST /v1/chains.
MAX_FRAMES = 121
# The distilled schedule (FastVideo fastvideo/configs/pipelines/wan.py,
# FastWan2_2_TI2V_5B_Config: dmd_denoising_steps [1000, 757, 522]; timestep = σ x 1000):
# the workflow's ManualSigmas node holds it, with the lcm sampler (x0, then fresh noise).
DMD_STEPS = 3


class FastWanInput(BaseModel):
    """One video: a prompt, and a start image for image-to-video."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=4000, description="What the video shows.")
    negative_prompt: str = Field(
        "", max_length=4000, description="What to avoid (used only with cfg above 1)."
    )
    start_image: ImageRef | None = Field(
        None, description="First frame: image-to-video. Absent: text-to-video."
    )
    preset: Literal["1280x704", "704x1280"] | None = Field(
        None, description="Landscape or portrait 720p; or give width and height instead."
    )
    width: int | None = Field(
        None,
        ge=64,
        le=1280,
        multiple_of=32,
        description="Default 1280, or from the start image's shape at about 1280x704 pixels; "
        "width x height at most 1280x720 pixels.",
    )
    height: int | None = Field(
        None, ge=64, le=1280, multiple_of=32, description="Default 704 (see width)."
    )
    num_frames: int = Field(
        121,
        ge=5,
        le=MAX_FRAMES,
        description="Frames, 4n+1, at most 121 (5 s at 24 fps: what FastWan was trained "
        "on); longer videos: a chain (POST /v1/chains).",
    )
    fps: int = Field(24, ge=1, le=60, description="Frames per second of the mp4.")
    steps: int = Field(
        DMD_STEPS,
        ge=DMD_STEPS,
        le=DMD_STEPS,
        description="Denoising steps: always 3. FastWan is distilled for exactly these three "
        "(σ 1.0, 0.757, 0.522: FastVideo's DMD timesteps 1000/757/522).",
    )
    cfg: float = Field(1.0, ge=1.0, le=20.0, description="Guidance; 1 skips the negative pass.")
    loras: list[LoraSpec] = loras_field(
        "Your LoRAs for this job (trained for Wan2.2 TI2V-5B), chained onto the model in "
        "order; downloaded once into the LoRA cache."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Absent: random; the seed used is returned."
    )

    @model_validator(mode="after")
    def _sizes(self) -> FastWanInput:
        self.width, self.height = resolve_size(
            self.preset,
            self.width,
            self.height,
            PRESETS,
            (1280, 704),
            MAX_PIXELS,
            "use 1280x704, 704x1280 or smaller",
            image_decides=self.start_image is not None,
        )
        check_frame_count(self.num_frames)
        return self
