"""Input checks every video service shares: the frame size (a preset, or width and
height, or the start image's shape) and the frame count that Wan's VAE accepts (4n+1).
Raise ValueError, which the input models turn into a 422 naming the field."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image


def resolve_size(
    preset: str | None,
    width: int | None,
    height: int | None,
    presets: Mapping[str, tuple[int, int]],
    default: tuple[int, int],
    max_pixels: int,
    hint: str,
    *,
    image_decides: bool = False,
) -> tuple[int, int] | tuple[None, None]:
    """(width, height) from a preset, both sides, or the default; at most `max_pixels`.
    With nothing given and `image_decides` (a start image): (None, None), the size comes
    from the image once it is on disk (`size_for_image`)."""
    if preset is not None:
        if width is not None or height is not None:
            raise ValueError("give `preset`, or `width` and `height`, not both")
        width, height = presets[preset]
    elif (width is None) != (height is None):
        raise ValueError("give both `width` and `height`, or neither")
    elif width is None and image_decides:
        return None, None
    width, height = width or default[0], height or default[1]
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} is larger than 720p ({max_pixels} pixels); {hint}")
    return width, height


def check_frame_count(num_frames: int) -> None:
    """Wan's VAE packs 4 frames per latent after the first: 4n+1 frames."""
    if (num_frames - 1) % 4:
        raise ValueError(
            f"num_frames must be 4n+1 (the VAE packs 4 frames per latent), got "
            f"{num_frames}; use {num_frames - (num_frames - 1) % 4}"
        )


def frame_count_at_least(frames: int) -> int:
    """The smallest 4n+1 frame count of at least `frames` (see check_frame_count)."""
    return frames + (-(frames - 1)) % 4


SizeRule = Callable[[tuple[int, int], int, int], tuple[int, int]]


def fit_to_area(size: tuple[int, int], pixels: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the image's aspect ratio in at most `pixels` pixels, sides
    multiples of `multiple`: Wan's A14B image-to-video rule (Wan-Video/Wan2.2
    wan/image2video.py: `lat_h = sqrt(max_area * h / w) // stride`, the same for w).
    Plus 1e-6 before flooring: an image already of the budget's shape keeps its size (in
    float arithmetic sqrt(832 * 480 * 480 / 832) is 479.99..., which floors to 464)."""
    aspect = size[1] / size[0]
    height = int((math.sqrt(pixels * aspect) + 1e-6) // multiple * multiple)
    width = int((math.sqrt(pixels / aspect) + 1e-6) // multiple * multiple)
    return max(width, multiple), max(height, multiple)


def best_output_size(size: tuple[int, int], pixels: int, multiple: int) -> tuple[int, int]:
    """(width, height) in at most `pixels` pixels, sides multiples of `multiple`, whose
    aspect ratio is closest to the image's: Wan's TI2V-5B image-to-video rule (Wan2.2
    wan/utils/utils.py `best_output_size`, used by wan/textimage2video.py): the better of
    rounding the width first or the height first."""
    ratio = size[0] / size[1]
    width = math.sqrt(pixels * ratio)
    height = pixels / width
    w1 = max(int(width // multiple * multiple), multiple)
    h1 = max(int(pixels / w1 // multiple * multiple), multiple)
    h2 = max(int(height // multiple * multiple), multiple)
    w2 = max(int(pixels / h2 // multiple * multiple), multiple)
    off1 = max(ratio / (w1 / h1), (w1 / h1) / ratio)
    off2 = max(ratio / (w2 / h2), (w2 / h2) / ratio)
    return (w1, h1) if off1 < off2 else (w2, h2)


def size_for_image(
    field: str, pixels: int, multiple: int, max_side: int, rule: SizeRule
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A ComfyUI service's `derive` hook: when the job gave no size and has an image in
    `field` (a local file by then), the video's width and height from the image's shape
    by the model's own `rule`, so a portrait photo is not cropped to landscape (sides at
    most `max_side`)."""

    def derive(values: Mapping[str, Any]) -> dict[str, Any]:
        if values.get("width") is not None or not values.get(field):
            return {}
        with Image.open(Path(values[field])) as image:
            width, height = rule(image.size, pixels, multiple)
        return {"width": min(width, max_side), "height": min(height, max_side)}

    return derive
