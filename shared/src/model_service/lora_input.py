"""The `loras` input field every service that takes per-job LoRAs declares (shown in /docs).

One shape everywhere: `[{"source": "hf://<owner>/<repo>/<file>.safetensors[@rev]" or an
http(s) URL, "strength": 1.0}]`, at most `MAX_LORAS`. A service with more than one
diffusion model adds its own keys (Wan2.2-14B: `applies_to`, which expert) by subclassing
`LoraSpec`. How a source is read is `model_service.loras.parse_lora_source`'s business.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_service.errors import LoraInvalid
from model_service.loras import parse_lora_source

MAX_LORAS = 8
MIN_STRENGTH, MAX_STRENGTH = -5.0, 5.0


class LoraSpec(BaseModel):
    """A LoRA applied to this job only, downloaded once into the service's LoRA cache."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        ...,
        max_length=2048,
        description="`hf://<owner>/<repo>/<path>.safetensors[@revision]` or an http(s) URL "
        "of a .safetensors file.",
    )
    strength: float = Field(
        1.0, ge=MIN_STRENGTH, le=MAX_STRENGTH, description="Weight of the LoRA."
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        try:
            parse_lora_source(value, field="source")
        except LoraInvalid as exc:
            raise ValueError(exc.message) from None
        return value


def loras_field(description: str = "Your LoRAs for this job, applied in order.") -> Any:
    """The `loras` field: `loras: list[LoraSpec] = loras_field()`."""
    return Field(default_factory=list, max_length=MAX_LORAS, description=description)
