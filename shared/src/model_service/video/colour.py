"""Colour-drift correction for long videos made of chained segments.

Each segment is generated from the last frame of the one before, and every hop shifts
saturation, brightness or hue a little; the next segment conditions on the shifted frame,
so the shifts compound. The fix the original systems converged on (InfiniteTalk's
`match_and_blend_colors`, Wan2GP's sliding-window colour correction) is kept: a Reinhard
transfer of per-channel mean and std in CIE Lab, always against a *fixed* reference (the
start image), never against the previous clip, blended by a strength.

Two pitfalls are avoided: matching every frame on its own flickers, and one constant
transform per clip makes a step at each join. Here each segment gets one smooth transform
that varies linearly in time, identity at the join and full correction at the tail (see
`correct_segment`). The transform can be fitted once (`fit_segment`), stored as JSON
(`SegmentCorrection.to_dict`) and applied later, frame by frame (`SegmentCorrection.apply`).

sRGB <-> Lab (D65) is implemented here with numpy, vectorised, in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Frame = npt.NDArray[np.uint8]  # H x W x 3 sRGB
Lab = npt.NDArray[np.float32]  # ... x 3: L in [0, 100], a and b roughly [-128, 127]
_Vec = npt.NDArray[np.float64]  # one value per Lab channel

# Std ratio limits: a flat segment (std ~ 0) must not be stretched into noise, nor a flat
# reference squash a segment to one colour.
MIN_SCALE = 0.5
MAX_SCALE = 2.0
_STD_FLOOR = 0.5  # Lab units: stds below this count as this (flat, or just noise)
# Statistics come from a strided subsample of about this many pixels per frame.
STATS_MAX_PIXELS = 65_536


def _srgb_to_linear_lut() -> npt.NDArray[np.float32]:
    c = np.arange(256, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear.astype(np.float32)


_LINEAR_STEPS = 65535  # linear light is quantised this finely (< 0.03 level) on the way out


def _linear_to_srgb_lut() -> npt.NDArray[np.uint8]:
    v = np.arange(_LINEAR_STEPS + 1, dtype=np.float64) / _LINEAR_STEPS
    srgb = np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)
    return np.rint(srgb * 255.0).astype(np.uint8)


_TO_LINEAR = _srgb_to_linear_lut()
_TO_SRGB = _linear_to_srgb_lut()
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
# Divide by the white point (the row sums: D65), so sRGB greys get a = b = 0 exactly.
_RGB_TO_XYZN = _RGB_TO_XYZ / _RGB_TO_XYZ.sum(axis=1, keepdims=True)
# f = (f(X), f(Y), f(Z)) -> (L, a, b) is affine: L = 116 fY - 16, a = 500 (fX - fY),
# b = 200 (fY - fZ).
_F_TO_LAB = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_LAB_OFFSET: Lab = np.array([-16.0, 0.0, 0.0], dtype=np.float32)
# Row-vector forms (pixels @ M.T) in float32, the working precision.
_TO_XYZ_T = _RGB_TO_XYZN.T.astype(np.float32)
_TO_RGB_T = np.linalg.inv(_RGB_TO_XYZN).T.astype(np.float32)
_TO_LAB_T = _F_TO_LAB.T.astype(np.float32)
_FROM_LAB_T = np.linalg.inv(_F_TO_LAB).T.astype(np.float32)
_DELTA = 6.0 / 29.0
_SLOPE = np.float32(1.0 / (3 * _DELTA**2))  # of f's linear part near black


def _check_frame(frame: Frame) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 frame, got {frame.dtype} {frame.shape}")


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def srgb_to_lab(image: npt.NDArray[np.uint8]) -> Lab:
    """CIE Lab (D65) of 8-bit sRGB pixels, shape (..., 3) -> (..., 3) float32."""
    if image.dtype != np.uint8 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., 3) sRGB, got {image.dtype} {image.shape}")
    xyz: Lab = _TO_LINEAR[image] @ _TO_XYZ_T  # >= 0: every coefficient is positive
    f = np.power(xyz, np.float32(1 / 3))  # float32 cbrt is several times slower
    dark = xyz <= _DELTA**3
    f[dark] = xyz[dark] * _SLOPE + np.float32(4 / 29)
    lab: Lab = f @ _TO_LAB_T
    lab += _LAB_OFFSET
    return lab


def lab_to_srgb(lab: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """8-bit sRGB of Lab (D65) values, rounded; out-of-gamut colours are clipped."""
    f: Lab = np.subtract(lab, _LAB_OFFSET, dtype=np.float32) @ _FROM_LAB_T
    xyz = f * f * f
    dark = f <= _DELTA
    xyz[dark] = (f[dark] - np.float32(4 / 29)) / _SLOPE
    linear = np.clip(xyz @ _TO_RGB_T, 0.0, 1.0)
    linear *= _LINEAR_STEPS
    linear += 0.5
    return _TO_SRGB[linear.astype(np.uint16)]


@dataclass(frozen=True)
class ColourStats:
    """Per-channel mean and std of (L, a, b); plain floats, so it can go in job state."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def _of(cls, mean: _Vec, std: _Vec) -> ColourStats:
        m, s = mean.tolist(), std.tolist()
        return cls((m[0], m[1], m[2]), (s[0], s[1], s[2]))


def _lab_sample(frame: Frame, max_pixels: int) -> npt.NDArray[np.float64]:
    """Lab of a strided subsample of `frame`, as (N, 3) float64."""
    _check_frame(frame)
    height, width = frame.shape[:2]
    step = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    return srgb_to_lab(frame[::step, ::step]).reshape(-1, 3).astype(np.float64)


def colour_stats(
    frames: Frame | Iterable[Frame], *, max_pixels: int = STATS_MAX_PIXELS
) -> ColourStats:
    """Lab statistics of one image (H x W x 3) or of frames pooled (N x H x W x 3 or any
    iterable of frames, read once). Each frame is subsampled to about `max_pixels`."""
    items: Iterable[Frame] = (
        (frames,) if isinstance(frames, np.ndarray) and frames.ndim == 3 else frames
    )
    count, total, squares = 0, np.zeros(3), np.zeros(3)
    for frame in items:
        lab = _lab_sample(frame, max_pixels)
        count += len(lab)
        total += lab.sum(axis=0)
        squares += (lab * lab).sum(axis=0)
    if count == 0:
        raise ValueError("colour_stats needs at least one frame")
    mean = total / count
    return ColourStats._of(mean, np.sqrt(np.maximum(squares / count - mean * mean, 0.0)))


def _affine(
    src_mean: _Vec, src_std: _Vec, tgt_mean: _Vec, tgt_std: _Vec, strength: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Per-channel (scale, offset) of the strength-blended Reinhard transfer:
    x + strength * ((x - src_mean) * k + tgt_mean - x), k = tgt_std / src_std clamped."""
    k = np.clip(
        np.maximum(tgt_std, _STD_FLOOR) / np.maximum(src_std, _STD_FLOOR), MIN_SCALE, MAX_SCALE
    )
    scale = 1.0 + strength * (k - 1.0)
    offset = strength * (tgt_mean - src_mean * k)
    return scale.astype(np.float32), offset.astype(np.float32)


def _transfer(
    frame: Frame, scale: npt.NDArray[np.float32], offset: npt.NDArray[np.float32]
) -> Frame:
    return lab_to_srgb(srgb_to_lab(frame) * scale + offset)


def match_colours(
    frame: Frame, source: ColourStats, target: ColourStats, strength: float = 1.0
) -> Frame:
    """Move `frame` from `source` statistics to `target` statistics in Lab (Reinhard), std
    ratio clamped to [MIN_SCALE, MAX_SCALE], blended with the original by `strength`."""
    _check_frame(frame)
    _check_strength(strength)
    if strength == 0.0:
        return frame.copy()
    scale, offset = _affine(
        np.array(source.mean),
        np.array(source.std),
        np.array(target.mean),
        np.array(target.std),
        strength,
    )
    return _transfer(frame, scale, offset)


@dataclass(frozen=True)
class SegmentCorrection:
    """One segment's fitted colour correction (pass 1 of `correct_segment`), in plain
    Python numbers so it can be stored as JSON (`to_dict` / `from_dict`) and applied
    later, frame by frame (`apply`), to the segment's frames or to a lossless copy of its
    last frame (`apply_last`).

    The 6-vectors are (L, a, b) means then (L, a, b) stds: `y_mean` and `slope` the
    least-squares line over frame index (centred on `t_mean`), `first` the target at
    frame 0, `ref` the target at frame `n - 1`.
    """

    n: int  # frames in the segment
    t_mean: float
    y_mean: tuple[float, ...]
    slope: tuple[float, ...]
    first: tuple[float, ...]
    ref: tuple[float, ...]
    strength: float

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"a segment correction needs n >= 1 frames, got {self.n}")
        for name in ("y_mean", "slope", "first", "ref"):
            if len(getattr(self, name)) != 6:
                raise ValueError(f"{name} must hold 6 numbers, got {getattr(self, name)}")
        _check_strength(self.strength)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; `from_dict` restores it exactly."""
        return {
            "n": self.n,
            "t_mean": self.t_mean,
            "y_mean": list(self.y_mean),
            "slope": list(self.slope),
            "first": list(self.first),
            "ref": list(self.ref),
            "strength": self.strength,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentCorrection:
        def vec(name: str) -> tuple[float, ...]:
            return tuple(float(v) for v in data[name])

        return cls(
            n=int(data["n"]),
            t_mean=float(data["t_mean"]),
            y_mean=vec("y_mean"),
            slope=vec("slope"),
            first=vec("first"),
            ref=vec("ref"),
            strength=float(data["strength"]),
        )

    def apply(self, frame: Frame, t: int) -> Frame:
        """Frame `t` (0 .. n-1) of the segment, corrected: mapped from the fitted
        statistics at `t` to a target moving linearly from `first` to `ref`."""
        if not 0 <= t < self.n:
            raise ValueError(f"frame index {t} is outside this segment's 0..{self.n - 1}")
        _check_frame(frame)
        if self.strength == 0.0:
            return frame.copy()
        u = t / (self.n - 1) if self.n > 1 else 1.0
        src = np.array(self.y_mean) + np.array(self.slope) * (t - self.t_mean)
        tgt = (1.0 - u) * np.array(self.first) + u * np.array(self.ref)
        return _transfer(frame, *_affine(src[:3], src[3:], tgt[:3], tgt[3:], self.strength))

    def apply_last(self, frame: Frame) -> Frame:
        """`apply(frame, n - 1)`: e.g. a lossless copy of the last frame, the next
        segment's start image."""
        return self.apply(frame, self.n - 1)


def fit_segment(
    frames: Iterable[Frame],
    reference: ColourStats,
    *,
    strength: float = 1.0,
    start: ColourStats | None = None,
) -> SegmentCorrection:
    """Pass 1 of `correct_segment` alone: reads `frames` once (a one-shot iterator is
    fine) and returns the correction to apply to them. See `correct_segment` for the
    method and `start`. No frames: ValueError."""
    _check_strength(strength)
    correction = _fit(frames, reference, strength, start)
    if correction is None:
        raise ValueError("fit_segment needs at least one frame")
    return correction


def _fit(
    frames: Iterable[Frame], reference: ColourStats, strength: float, start: ColourStats | None
) -> SegmentCorrection | None:
    # Per-frame (mean, std) as 6 numbers, then a least-squares line over time.
    rows = []
    for frame in frames:
        lab = _lab_sample(frame, STATS_MAX_PIXELS)
        rows.append(np.concatenate([lab.mean(axis=0), lab.std(axis=0)]))
    n = len(rows)
    if n == 0:
        return None
    per_frame = np.array(rows)
    times = np.arange(n, dtype=np.float64)
    t_mean, y_mean = times.mean(), per_frame.mean(axis=0)
    dt = times - t_mean
    slope = (dt @ (per_frame - y_mean)) / (dt @ dt) if n > 1 else np.zeros(6)
    ref = np.concatenate([np.array(reference.mean), np.array(reference.std)])
    first = (
        np.concatenate([np.array(start.mean), np.array(start.std)])
        if start is not None
        else y_mean - slope * t_mean
    )
    return SegmentCorrection(
        n=n,
        t_mean=float(t_mean),
        y_mean=tuple(y_mean.tolist()),
        slope=tuple(slope.tolist()),
        first=tuple(first.tolist()),
        ref=tuple(ref.tolist()),
        strength=float(strength),
    )


def correct_segment(
    frames: Iterable[Frame],
    reference: ColourStats,
    *,
    strength: float = 1.0,
    start: ColourStats | None = None,
) -> Iterator[Frame]:
    """Correct one segment's colour drift against `reference` (the start image's stats),
    yielding corrected frames lazily.

    Two passes over `frames`, which must be re-iterable (a list, an N x H x W x 3 array, or
    an object whose `__iter__` reopens a file; a one-shot iterator is refused): the first
    measures every frame's Lab mean and std on a subsample (a few numbers per frame, so
    memory stays bounded) and fits a straight line to them over time; the second
    transforms and yields one frame at a time. The two passes are `fit_segment` and
    `SegmentCorrection.apply`, usable apart to store the correction.

    Why a ramp: generation drifts progressively, frame 0 reproduces the conditioning image
    and the tail has drifted most. Frame t is mapped from the fitted statistics at t to a
    target that moves linearly from `start` (frame 0) to `reference` (last frame). So

    - the join is seamless: frame 0 keeps the statistics of the frame the segment was
      conditioned on, i.e. the previous (corrected) segment's last frame. A constant
      transform from the segment's pooled stats would shift frame 0 by about half the
      segment's drift and show a step at every join;
    - the tail lands on the reference, so the next segment starts from a corrected frame
      and nothing compounds over the chain;
    - the transform varies smoothly, so there is no per-frame flicker.

    `start`: statistics of the conditioning image (the start image for the first segment,
    else the previous segment's corrected last frame). Pass it when the model may shift
    frame 0 itself; by default frame 0 is left as generated. A segment of one frame is
    matched to `reference`.
    """
    _check_strength(strength)
    if strength == 0.0:
        return iter(frames)
    if iter(frames) is frames:
        raise TypeError(
            "correct_segment reads the frames twice: pass a list, an array or a "
            "re-iterable source, not a one-shot iterator"
        )
    return _correct(frames, reference, strength, start)


def _correct(
    frames: Iterable[Frame], reference: ColourStats, strength: float, start: ColourStats | None
) -> Iterator[Frame]:
    correction = _fit(frames, reference, strength, start)
    if correction is None:
        return
    n = correction.n
    t = -1
    for t, frame in enumerate(frames):
        if t >= n:
            break
        yield correction.apply(frame, t)
    if t != n - 1:
        raise ValueError(f"frames gave {n} frames on the first pass but not on the second")


def drift(stats: ColourStats, reference: ColourStats) -> float:
    """How far `stats` are from `reference`, in Lab units: the distance between the mean
    colours (CIE76 delta E, brightness and casts) plus the distance between the per-channel
    stds (contrast and saturation). Around 1 is hard to see; 5 and up is obvious."""
    mean = np.subtract(stats.mean, reference.mean)
    std = np.subtract(stats.std, reference.std)
    return float(np.linalg.norm(mean) + np.linalg.norm(std))
