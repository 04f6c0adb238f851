"""Hires: a second pass at a larger size that refines the first pass's upscaled result.

The method and its defaults are the Headless-Wan2GP worker's Qwen "hires fix" (its
`hires_scale`, `hires_steps=6`, `hires_denoise=0.5`, `hires_upscale_method="bicubic"`):
the first pass's image is scaled up (bicubic) by `hires_scale`, encoded by the VAE, noised
to the level `denoise` of the way up the schedule, and denoised again by the same edit
pipeline (same prompt, input images and seed) over the schedule's last `steps` steps.

The level is the img2img pipelines' own rule (diffusers' `QwenImageImg2ImgPipeline`
`strength`): of a schedule of round(steps / denoise) steps, the last `steps` are run, and
the latents start at the first of them, sigma = the scheduler's own (shifted) value there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage
from PIL import Image

from .schema import HIRES_DENOISE, HIRES_STEPS

SIZE_MULTIPLE = 16  # the VAE's 8x and the transformer's 2x2 patches

_calculate_shift = cast("Callable[..., float]", pipeline_qwenimage.calculate_shift)


@dataclass(frozen=True)
class Hires:
    scale: float
    steps: int = HIRES_STEPS
    denoise: float = HIRES_DENOISE

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: the first's times `scale`, in multiples of 16."""
        return _multiple(width * self.scale), _multiple(height * self.scale)

    def schedule(self) -> list[float]:
        """The unshifted sigmas of the second pass: the last `steps` of a schedule of
        round(steps / denoise) steps, as the edit pipelines lay one out (1 to 1/n)."""
        total = max(self.steps, round(self.steps / self.denoise))
        full = np.linspace(1.0, 1 / total, total)
        return [float(sigma) for sigma in full[total - self.steps :]]

    @torch.no_grad()
    def start_latents(
        self, pipe: Any, images: list[Image.Image], generator: torch.Generator
    ) -> torch.Tensor:
        """The upscaled first-pass images as packed latents, noised to where the second
        pass's schedule begins."""
        width, height = self.size(*images[0].size)
        scaled = [image.resize((width, height), Image.Resampling.BICUBIC) for image in images]
        device, dtype = pipe._execution_device, pipe.transformer.dtype
        pixels = torch.cat([pipe.image_processor.preprocess(i, height, width) for i in scaled])
        clean = pipe._encode_vae_image(pixels.unsqueeze(2).to(device, dtype), generator)
        channels, rows, cols = clean.shape[1], clean.shape[3], clean.shape[4]
        packed: torch.Tensor = pipe._pack_latents(clean, clean.shape[0], channels, rows, cols)
        sigma = self.start_sigma(pipe.scheduler, packed.shape[1], device)
        noise = torch.randn(packed.shape, generator=generator, device=device, dtype=dtype)
        return (1.0 - sigma) * packed + sigma * noise

    def start_sigma(self, scheduler: Any, image_seq_len: int, device: torch.device) -> float:
        """The first sigma the pipeline will run at for `schedule()`: the scheduler's own
        shift applied (with the pipeline's `mu` for this many latent tokens)."""
        config = scheduler.config
        mu = _calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        trial = copy.deepcopy(scheduler)
        trial.set_timesteps(sigmas=self.schedule(), device=device, mu=mu)
        return float(trial.sigmas[0])


def _multiple(value: float) -> int:
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
