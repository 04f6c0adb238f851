"""Typed input of the Wan2.2-14B service (shown in /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_service.lora_input import LoraSpec as BaseLoraSpec
from model_service.lora_input import loras_field
from model_service.media_refs import ImageRef
from model_service.video_size import check_frame_count, resolve_size

PRESETS: dict[str, tuple[int, int]] = {
    "480p": (832, 480),
    "480p_portrait": (480, 832),
    "720p": (1280, 720),
    "720p_portrait": (720, 1280),
}
MAX_PIXELS = 1280 * 720
MAX_FRAMES = 121  # the experts were trained on 81; longer clips lose coherence
# Defaults per mode, as ComfyUI's Wan2.2 14B templates (comfyui-workflow-templates-json
# 0.1.47: video_wan2_2_14B_{t2v,i2v,flf2v}.json) set them.
LIGHTNING = {"steps": 4, "split_step": 2, "cfg": 1.0, "shift": 5.0}  # lightx2v 4-step LoRAs
FULL = {"steps": 20, "split_step": 10, "cfg": 3.5, "shift": 5.0}  # t2v and i2v without them
FULL_FLF = {"steps": 20, "split_step": 10, "cfg": 4.0, "shift": 8.0}  # flf2v without them
# The 4-step LoRA pairs `lightning_loras` chooses from. "v1": Wan2.2-Lightning's Seko V1
# (i2v) / V1.1 (t2v), repackaged by Comfy-Org: ComfyUI's templates' pair, in the manifest,
# downloaded at start. "distill": lightx2v/Wan2.2-Distill-Loras (i2v 2025-10-22, t2v
# 2025-12-17), trained on the same 4 timesteps (its configs: denoising_step_list 1000, 750,
# 500, 250 at sample_shift 5, boundary after step 2), fetched into the LoRA cache by the
# first job that asks and checked against the experts like any job LoRA.
DISTILL_REPO = "hf://lightx2v/Wan2.2-Distill-Loras"
DISTILL_LORAS: dict[str, dict[str, str]] = {
    mode: {
        expert: f"{DISTILL_REPO}/wan2.2_{mode}_A14b_{expert}_noise_lora_rank64_lightx2v_4step_"
        f"{day}.safetensors"
        for expert in ("high", "low")
    }
    for mode, day in (("t2v", "1217"), ("i2v", "1022"))
}
# Wan's standard negative prompt: Wan-Video/Wan2.2 wan/configs/shared_config.py
# (`sample_neg_prompt`), the one ComfyUI's Wan2.2 templates use. It matters only at cfg > 1
# (ComfyUI skips the negative pass at cfg 1, the lightning default).
WAN_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class LoraSpec(BaseLoraSpec):
    """A LoRA applied to this job only (`source`, `strength`: model_service.lora_input),
    on one expert or both."""

    applies_to: Literal["high", "low", "both"] = Field(
        "both", description="Which expert gets it: the high-noise, the low-noise, or both."
    )


class Wan14bInput(BaseModel):
    """One video. No image: text-to-video; a start image: image-to-video; a start and an
    end image: first-last-frame (the video travels from one to the other)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=4000, description="What the video shows.")
    negative_prompt: str | None = Field(
        None,
        max_length=4000,
        description="What to avoid (used only with cfg above 1). Absent: Wan's standard "
        "negative prompt (the authors' and the templates'); \"\" for none.",
    )
    start_image: ImageRef | None = Field(None, description="First frame: image-to-video.")
    end_image: ImageRef | None = Field(
        None, description="Last frame (with start_image): first-last-frame."
    )
    preset: Literal["480p", "480p_portrait", "720p", "720p_portrait"] | None = Field(
        None, description="832x480, 480x832, 1280x720 or 720x1280; or give width and height."
    )
    width: int | None = Field(
        None,
        ge=64,
        le=1280,
        multiple_of=16,
        description="Default 832, or from the start image's shape at about 832x480 pixels; "
        "width x height at most 1280x720 pixels.",
    )
    height: int | None = Field(
        None, ge=64, le=1280, multiple_of=16, description="Default 480 (see width)."
    )
    num_frames: int = Field(
        81, ge=5, le=MAX_FRAMES, description="Frames, 4n+1 (81 = 5 s at 16 fps)."
    )
    fps: int = Field(16, ge=1, le=60, description="Frames per second of the mp4.")
    lightning: bool = Field(
        True,
        description="Use the lightx2v 4-step LoRA pair (4 steps, cfg 1); false: the full "
        "model (20 steps, cfg 3.5), about 10x slower.",
    )
    lightning_loras: Literal["v1", "distill"] = Field(
        "v1",
        description="Which 4-step LoRA pair `lightning` uses: `v1`, Wan2.2-Lightning's "
        "(ComfyUI's templates'), or `distill`, lightx2v's newer Wan2.2-Distill-Loras "
        "(i2v 1022, t2v 1217), fetched on first use and listed in `loras`.",
    )
    steps: int | None = Field(None, ge=2, le=60, description="Default 4 (lightning) or 20.")
    split_step: int | None = Field(
        None,
        ge=1,
        le=59,
        description="Step where the low-noise expert takes over; default half the steps.",
    )
    cfg: float | None = Field(
        None,
        ge=1.0,
        le=20.0,
        description="Default 1.0 (lightning), else 3.5 (4.0 for first-last-frame).",
    )
    shift: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="Flow shift of both samplers. Default 5 (8 for first-last-frame "
        "without lightning).",
    )
    loras: list[LoraSpec] = loras_field("Your LoRAs for this job.")
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Absent: random; the seed used is returned."
    )

    @model_validator(mode="after")
    def _resolve(self) -> Wan14bInput:
        if self.end_image is not None and self.start_image is None:
            raise ValueError("end_image needs a start_image (first-last-frame)")
        self.width, self.height = resolve_size(
            self.preset,
            self.width,
            self.height,
            PRESETS,
            (832, 480),
            MAX_PIXELS,
            "use a preset or a smaller size",
            image_decides=self.start_image is not None,
        )
        check_frame_count(self.num_frames)
        full = FULL_FLF if self.end_image is not None else FULL
        defaults = LIGHTNING if self.lightning else full
        self.steps = self.steps or int(defaults["steps"])
        if self.split_step is None:
            self.split_step = self.steps // 2
        if not 1 <= self.split_step < self.steps:
            raise ValueError(
                f"split_step must be between 1 and steps - 1 ({self.steps - 1}); "
                f"got {self.split_step}"
            )
        self.cfg = self.cfg if self.cfg is not None else defaults["cfg"]
        self.shift = self.shift if self.shift is not None else defaults["shift"]
        if self.negative_prompt is None:
            self.negative_prompt = WAN_NEGATIVE
        if self.lightning and self.lightning_loras == "distill":
            self._add_distill_pair()
        return self

    def _add_distill_pair(self) -> None:
        """The distill pair goes first in `loras` (once: a stored job validated again
        keeps one pair), in place of the built-in pair, one file per expert."""
        pair = DISTILL_LORAS["t2v" if self.start_image is None else "i2v"]
        present = {lora.source for lora in self.loras}
        self.loras[:0] = [
            LoraSpec(source=source, applies_to=expert)
            for expert, source in pair.items()
            if source not in present
        ]

    @property
    def mode(self) -> str:
        if self.start_image is None:
            return "t2v"
        return "flf" if self.end_image is not None else "i2v"
