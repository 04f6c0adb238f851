"""Typed input of the Qwen-Image-Edit service (shown in /docs). No torch here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_service.lora_input import LoraSpec, loras_field
from model_service.media_refs import ImageRef

MAX_INPUT_IMAGES = 3  # Edit-2509 and 2511 (QwenImageEditPlusPipeline) take up to three.
MAX_REFERENCES = 2  # they share those places with the input images
# The hires pass's defaults: the Headless-Wan2GP worker's Qwen hires fix (hires_steps=6,
# hires_denoise=0.5; qwen_image_edit/hires.py)
HIRES_STEPS = 6
HIRES_DENOISE = 0.5
MASK_FEATHER = 8  # px (qwen_image_edit/inpaint.py)


class QwenEditInput(BaseModel):
    """One image edit: input image(s) and a prompt saying what to change."""

    model_config = ConfigDict(extra="forbid")

    image: ImageRef | None = Field(None, description="The image to edit (or use `images`).")
    images: list[ImageRef] | None = Field(
        None,
        min_length=1,
        max_length=MAX_INPUT_IMAGES,
        description="1 to 3 input images; more than one needs the edit-2509 or edit-2511 model.",
    )
    prompt: str = Field(..., min_length=1, max_length=2000, description="What to change.")
    negative_prompt: str = Field(" ", max_length=2000, description="What to avoid.")
    steps: int | None = Field(
        None,
        ge=2,  # one step divides by zero in the Qwen scheduler's shift_terminal: a black image
        le=100,
        description="Denoising steps, 2 or more (default: the loaded weights' own: 40 for "
        "2509 and 2511, 50 for Edit, 4 or 8 with Lightning).",
    )
    true_cfg_scale: float | None = Field(
        None,
        ge=1.0,
        le=20.0,
        description="Guidance (default: the loaded weights' own: 4, or 1 with Lightning); 1 "
        "turns the negative pass off (faster).",
    )
    loras: list[LoraSpec] = loras_field(
        "Your LoRAs for this job (Qwen-Image / Qwen-Image-Edit LoRAs), applied to the "
        "transformer with diffusers at their strengths, removed after the job. Not on "
        "Nunchaku's 4-bit transformer (refused with `lora_invalid`)."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Absent: random; the seed used is returned."
    )
    num_images: int = Field(1, ge=1, le=6, description="Images to generate.")
    width: int | None = Field(
        None,
        ge=64,
        le=2048,
        multiple_of=16,
        description="Output width (default: about 1 megapixel at the last input image's aspect).",
    )
    height: int | None = Field(
        None, ge=64, le=2048, multiple_of=16, description="Output height (see width)."
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="File format of the images."
    )
    mask: ImageRef | None = Field(
        None,
        description="Inpaint: white (value > 128) marks where to change the first input "
        "image (scaled to its size if it differs). The model sees that image with the "
        "masked area painted green; its result is blended back through the mask, so "
        "every pixel farther than `mask_feather` px from the mask is the input's own "
        "(byte for byte with output_format png and no width/height). Say in the prompt "
        "what goes there.",
    )
    references: list[ImageRef] | None = Field(
        None,
        min_length=1,
        max_length=MAX_REFERENCES,
        description="Style, subject or scene references (1-2 images, Edit-2509/2511): given "
        "to the model after the input images, each with its `reference_roles` entry; the "
        "prompt is completed from the roles.",
    )
    reference_roles: list[Literal["style", "subject", "scene"]] | None = Field(
        None, description="One per reference: what to take from it."
    )
    reference_strengths: list[Annotated[float, Field(ge=0.0, le=1.0)]] | None = Field(
        None,
        description="One per reference, 0-1 (default 1): how much of it the model gets "
        "(its contrast around mid-grey is scaled by it).",
    )
    hires_scale: float | None = Field(
        None,
        gt=1.0,
        le=2.0,
        description="Hires: a second pass at this many times the size (in multiples of 16) "
        "refining the first pass's result, scaled up (bicubic) and partly noised again.",
    )
    hires_steps: int = Field(
        HIRES_STEPS, ge=1, le=50, description="Hires: the second pass's steps."
    )
    hires_denoise: float = Field(
        HIRES_DENOISE,
        ge=0.05,
        le=1.0,
        description="Hires: how much of the upscaled picture is redone (0.05: a light touch; "
        "1: from noise).",
    )
    mask_feather: int = Field(
        MASK_FEATHER,
        ge=0,
        le=128,
        multiple_of=2,
        description="Inpaint: px outside the mask over which the result fades into the "
        "input (0: a hard edge).",
    )

    @model_validator(mode="after")
    def _one_image_source(self) -> QwenEditInput:
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of `image` or `images`")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both `width` and `height`, or neither")
        if self.image is not None:
            self.images, self.image = [self.image], None
        count = len(self.references or [])
        if len(self.reference_roles or []) != count:
            raise ValueError("give one `reference_roles` entry per reference")
        if self.reference_strengths is not None and len(self.reference_strengths) != count:
            raise ValueError("give one `reference_strengths` entry per reference, or none")
        if len(self.images or []) + count > MAX_INPUT_IMAGES:
            raise ValueError(
                f"input images and references together take at most {MAX_INPUT_IMAGES} "
                "places in the model's image list"
            )
        return self
