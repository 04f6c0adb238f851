"""Reference images: style, subject or scene transfer on Edit-2509/2511's multi-image input.

The Headless-Wan2GP worker's `qwen_image_style` took a style and a subject reference with
strengths and rewrote the prompt itself (with style and subject LoRAs we do not have; its
templates are not published). Ours, documented in the README:

- Each reference follows the input images in the model's image list, so the edit
  pipeline's own prompt template names it "Picture N" (diffusers' QwenImageEditPlusPipeline
  prefixes the prompt with "Picture 1: <image> Picture 2: <image> ...").
- The prompt is completed with one sentence per reference, by its role (`TEMPLATES`).
- `strength` (0-1) scales what the model gets of the reference: its pixels' contrast
  around mid-grey, `128 + strength * (value - 128)`: 1 is the image as sent, 0.5 a
  washed-out copy, 0 a flat grey (nothing to take).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

TEMPLATES = {
    "style": "Render the result in the visual style of Picture {n}: its colour palette, "
    "lighting, brushwork and texture.",
    "subject": "Include the subject shown in Picture {n}, keeping its identity, shape and details.",
    "scene": "Place it in the scene of Picture {n}: its setting, background and light.",
}
MID_GREY = 128


@dataclass(frozen=True)
class Reference:
    path: str
    role: str
    strength: float = 1.0


def of_inputs(inputs: dict[str, Any]) -> list[Reference]:
    """The job's references, in order (none without `references`)."""
    paths: list[str] = inputs.get("references") or []
    roles: list[str] = inputs.get("reference_roles") or []
    strengths: list[float] = inputs.get("reference_strengths") or [1.0] * len(paths)
    return [
        Reference(str(path), role, float(strength))
        for path, role, strength in zip(paths, roles, strengths, strict=True)
    ]


def scaled(image: Image.Image, strength: float) -> Image.Image:
    """The reference as the model gets it: contrast around mid-grey times `strength`."""
    if strength >= 1.0:
        return image
    return image.point(lambda value: round(MID_GREY + strength * (value - MID_GREY)))


def completed_prompt(prompt: str, references: list[Reference], first_picture: int) -> str:
    """`prompt` and a sentence per reference; the first reference is `first_picture`."""
    sentences = [
        TEMPLATES[ref.role].format(n=first_picture + index) for index, ref in enumerate(references)
    ]
    return " ".join([prompt.strip(), *sentences])
