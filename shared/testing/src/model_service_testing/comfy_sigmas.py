"""The σ lists ComfyUI 0.33.0 gives a sampler for a flow model (Wan), in plain Python, so
tests can pin each workflow's effective schedule without torch.

Formulas as in ComfyUI 0.33.0: `comfy/model_sampling.py` (`time_snr_shift`,
`ModelSamplingDiscreteFlow`: 1000 timesteps, multiplier 1000, timestep = σ x 1000) and
`comfy/samplers.py` (`simple_scheduler`, `normal_scheduler`). The default shift of the
Wan models is in `comfy/supported_models.py` (WAN21_T2V and its subclasses: 8.0), and
`ModelSamplingSD3` replaces it. ComfyUI computes in float32; these are float64 (they
agree to about 1e-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WAN_DEFAULT_SHIFT = 8.0  # comfy/supported_models.py WAN21_T2V sampling_settings


def time_snr_shift(shift: float, t: float) -> float:
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class FlowSampling:
    """`ModelSamplingDiscreteFlow` with `shift` (its defaults otherwise)."""

    shift: float
    timesteps: int = 1000
    multiplier: float = 1000.0

    def sigma(self, timestep: float) -> float:
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def timestep(self, sigma: float) -> float:
        return sigma * self.multiplier

    @property
    def sigmas(self) -> list[float]:
        n = self.timesteps
        return [self.sigma(i / n * self.multiplier) for i in range(1, n + 1)]

    @property
    def sigma_min(self) -> float:
        return self.sigma(1 / self.timesteps * self.multiplier)

    @property
    def sigma_max(self) -> float:
        return self.sigma(self.multiplier)


def simple(sampling: FlowSampling, steps: int) -> list[float]:
    table = sampling.sigmas
    stride = len(table) / steps
    return [table[-(1 + int(x * stride))] for x in range(steps)] + [0.0]


def normal(sampling: FlowSampling, steps: int) -> list[float]:
    start, end = sampling.timestep(sampling.sigma_max), sampling.timestep(sampling.sigma_min)
    append_zero = True
    if math.isclose(sampling.sigma(end), 0, abs_tol=0.00001):
        steps, append_zero = steps + 1, False
    step = (end - start) / (steps - 1) if steps > 1 else 0.0  # torch.linspace(start, end, steps)
    sigmas = [sampling.sigma(start + step * i) for i in range(steps)]
    return [*sigmas, 0.0] if append_zero else sigmas


SCHEDULERS = {"simple": simple, "normal": normal}


def schedule(scheduler: str, steps: int, shift: float = WAN_DEFAULT_SHIFT) -> list[float]:
    """What `BasicScheduler(scheduler, steps, denoise 1)` gives on a Wan model."""
    return SCHEDULERS[scheduler](FlowSampling(shift), steps)
