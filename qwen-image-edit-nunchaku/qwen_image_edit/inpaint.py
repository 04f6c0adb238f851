"""Inpaint: an edit confined to a mask, every pixel outside it kept as the input's.

What the model sees is what the Headless-Wan2GP worker's `image_inpaint` fed it: the
input image with the masked area painted pure green (mask value > 128; the mask scaled to
the image first). What comes back is better than that worker's: the model's picture is
scaled to the input image's size and blended over the input through the mask, full
strength on the mask, fading linearly to nothing over `mask_feather` px outside it, so a
pixel farther than that from the mask is the input's own (byte for byte in a PNG, where
the output keeps the input's size). Qwen-Image-Edit regenerates the whole picture, and
left alone it shifts colours and details it was not asked to touch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

GREEN = (0, 255, 0)
MASK_THRESHOLD = 128  # a mask value above it marks a pixel to change (the worker's rule)


@dataclass(frozen=True)
class Inpaint:
    """The input image as sent and the blend weights of the model's pixels (L, 0-255)."""

    original: Image.Image
    alpha: Image.Image
    feather: int

    def blend(self, generated: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
        """The model's picture inside the mask, the input's outside it, at `size` (the
        caller's width and height) or else at the input's size: whichever of the three
        pictures differs from it is scaled to it."""
        size = size or self.original.size
        original, alpha, generated = self.original, self.alpha, generated.convert("RGB")
        if original.size != size:
            original = original.resize(size, Image.Resampling.LANCZOS)
            alpha = alpha.resize(size, Image.Resampling.BILINEAR)
        if generated.size != size:
            generated = generated.resize(size, Image.Resampling.LANCZOS)
        return Image.composite(generated, original, alpha)


def model_size(aspect: float) -> tuple[int, int]:
    """The size the edit pipelines pick for an image of this width/height when none is
    given: 1024x1024 pixels' worth, multiples of 32 (diffusers 0.42
    `pipeline_qwenimage_edit_plus.calculate_dimensions`, also the base Edit pipeline's)."""
    width = math.sqrt(1024 * 1024 * aspect)
    return round(width / 32) * 32, round(width / aspect / 32) * 32


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask as 0/255 at `size` (scaled first if it differs), white = change."""
    grey = mask.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    return grey.point(lambda value: 255 if value > MASK_THRESHOLD else 0)


def green_composite(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with the masked pixels painted pure green: what the model is given."""
    return Image.composite(Image.new("RGB", image.size, GREEN), image.convert("RGB"), mask)


def feathered_alpha(mask: Image.Image, feather: int) -> Image.Image:
    """Blend weights: 255 on the mask, 0 farther than `feather` px (Chebyshev distance)
    from it, a linear ramp between. `feather` is even: the mask grown by feather/2, then
    averaged over a (feather + 1)-px square (border pixels average what is there)."""
    if feather % 2:
        raise ValueError("feather must be even")
    if feather == 0:
        return mask.copy()
    half = feather // 2
    window = 2 * half + 1
    binary = torch.from_numpy(np.asarray(mask, dtype=np.uint8) > MASK_THRESHOLD)
    grown = F.max_pool2d(binary[None, None].float(), window, stride=1, padding=half)
    weights = F.avg_pool2d(grown, window, stride=1, padding=half, count_include_pad=False)
    return Image.fromarray((weights[0, 0] * 255).round().to(torch.uint8).numpy())


def prepare(image: Image.Image, mask: Image.Image, feather: int) -> tuple[Image.Image, Inpaint]:
    """The model's input (the green composite) and what the output is blended with."""
    binary = binary_mask(mask, image.size)
    alpha = feathered_alpha(binary, feather)
    return green_composite(image, binary), Inpaint(image, alpha, feather)
