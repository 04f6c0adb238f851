"""Typed input of the InfiniteTalk service (shown in /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_service.lora_input import LoraSpec, loras_field
from model_service.media_refs import AudioRef, ImageRef

FPS = 25  # InfiniteTalk's audio features are 25 per second: one per frame
MOTION_FRAMES = 9  # frames of the previous window that start the next one
RESOLUTIONS = {"480p": 480 * 832, "720p": 720 * 1280}  # pixel budget; the image sets the shape


class InfiniteTalkInput(BaseModel):
    """A talking video: the face in `image` speaks `audio`, for as long as the audio."""

    model_config = ConfigDict(extra="forbid")

    image: ImageRef = Field(..., description="The face (first frame); its shape sets the video's.")
    audio: AudioRef = Field(
        ...,
        description="The speech: wav, mp3, m4a, flac or ogg, up to MAX_AUDIO_S seconds; the "
        "video lasts as long as the audio and carries it.",
    )
    prompt: str = Field(
        "a person talking to the camera",
        min_length=1,
        max_length=4000,
        description="What the video shows besides the speech.",
    )
    resolution: Literal["480p", "720p"] = Field(
        "480p", description="Pixel budget: 480p (832x480 area) or 720p (1280x720 area)."
    )
    width: int | None = Field(
        None, ge=64, le=1280, multiple_of=16, description="Instead of `resolution` (with height)."
    )
    height: int | None = Field(
        None, ge=64, le=1280, multiple_of=16, description="Instead of `resolution` (with width)."
    )
    steps: int = Field(6, ge=2, le=40, description="Denoising steps per window (lightx2v: 4-8).")
    audio_scale: float = Field(
        1.0, ge=0.0, le=5.0, description="How strongly the speech drives the face."
    )
    window_frames: int = Field(
        81,
        ge=17,
        le=161,
        description="Frames per window (4n+1); each window after the first starts from the "
        f"last {MOTION_FRAMES} frames of the one before.",
    )
    loudness_norm: bool = Field(
        True,
        description="Bring the speech to -23 LUFS for the audio encoder, as InfiniteTalk's "
        "authors do, so lip motion does not depend on the recording's level (the video's "
        "sound is untouched); false: the encoder hears the speech as recorded.",
    )
    colour_correction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Match each window's colours to the face image before the next window "
        "continues from it (InfiniteTalk's color_correction_strength, default 1.0), so long "
        "speech does not drift in colour; 0 turns it off.",
    )
    clip_vision: bool = Field(
        False,
        description="Also give every window CLIP-H features of the face, as InfiniteTalk's "
        "authors do (ComfyUI's template does not); off until a GPU comparison shows it helps.",
    )
    second_audio: AudioRef | None = Field(
        None, description="A second speaker, who speaks after the first (needs both masks)."
    )
    mask_1: ImageRef | None = Field(
        None, description="With second_audio: white where the first speaker is."
    )
    mask_2: ImageRef | None = Field(
        None, description="With second_audio: white where the second speaker is."
    )
    loras: list[LoraSpec] = loras_field(
        "Your LoRAs for this job (trained for Wan2.1 I2V 14B), chained onto the model after "
        "the lightx2v step-distill LoRA, before the InfiniteTalk patch; downloaded once into "
        "the LoRA cache."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Absent: random; the seed used is returned."
    )

    @model_validator(mode="after")
    def _check(self) -> InfiniteTalkInput:
        if (self.width is None) != (self.height is None):
            raise ValueError("give both `width` and `height`, or neither")
        if (
            self.width is not None
            and self.height is not None
            and self.width * self.height > (RESOLUTIONS["720p"])
        ):
            raise ValueError(f"{self.width}x{self.height} is larger than 720p; use less")
        if (self.window_frames - 1) % 4:
            raise ValueError(f"window_frames must be 4n+1, got {self.window_frames}")
        speakers = (self.second_audio, self.mask_1, self.mask_2)
        if any(x is not None for x in speakers) and any(x is None for x in speakers):
            raise ValueError("two speakers need second_audio, mask_1 and mask_2 together")
        return self
