"""Colour-drift correction: Lab conversion, Reinhard transfer, and a simulated 5-segment chain
in which each segment drifts further from the start image unless corrected."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from model_service.video.colour import (
    MAX_SCALE,
    ColourStats,
    SegmentCorrection,
    colour_stats,
    correct_segment,
    drift,
    fit_segment,
    lab_to_srgb,
    match_colours,
    srgb_to_lab,
)

Frame = npt.NDArray[np.uint8]
SEGMENTS = 5
FRAMES = 17  # 4N+1, like Wan


def start_image() -> Frame:
    """64 x 64: red/green gradients over a blue base, plus a few flat colour patches."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    img: npt.NDArray[np.float32] = np.stack(
        [40 + 2.5 * x, 50 + 2.2 * y, 90 + 0.5 * (x + y) / 2], axis=-1
    )
    img[8:20, 8:20] = (60, 80, 170)  # blue
    img[8:20, 40:52] = (200, 150, 120)  # skin
    img[40:52, 8:20] = (235, 235, 230)  # near white
    img[40:52, 40:52] = (25, 30, 20)  # dark
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def drifted(base: Frame, u: float, t: int, rng: np.random.Generator) -> Frame:
    """`base` after `u` of one hop's drift (more saturation and brightness, a red cast),
    moved `t` pixels sideways, with sensor-like noise."""
    x = base.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * (1 + 0.08 * u)
    x = x * (1 + 0.03 * u) + 2 * u
    x[..., 0] += 3 * u
    x[..., 2] -= 1 * u
    x += rng.normal(0.0, 1.5, x.shape).astype(np.float32)
    return np.roll(np.clip(np.rint(x), 0, 255).astype(np.uint8), t, axis=1)


def generate(conditioning: Frame, rng: np.random.Generator) -> list[Frame]:
    """A stand-in i2v segment: frame 0 reproduces the conditioning image, then it drifts,
    by a different amount each hop and faster early on (not linear in time)."""
    size = rng.uniform(0.7, 1.3)
    return [drifted(conditioning, size * (t / (FRAMES - 1)) ** 0.5, t, rng) for t in range(FRAMES)]


def chain(correct: bool) -> list[list[Frame]]:
    rng = np.random.default_rng(7)
    image = start_image()
    reference = colour_stats(image)
    segments, conditioning = [], image
    for _ in range(SEGMENTS):
        frames = generate(conditioning, rng)
        if correct:
            frames = list(correct_segment(frames, reference))
        segments.append(frames)
        conditioning = frames[-1]  # the service feeds the (corrected) last frame on
    return segments


def test_chain_drift_grows_uncorrected_and_stays_small_corrected() -> None:
    reference = colour_stats(start_image())
    raw = [drift(colour_stats(s), reference) for s in chain(correct=False)]
    fixed = [drift(colour_stats(s), reference) for s in chain(correct=True)]
    print("\nsegment drift vs start image (Lab units)")
    print("  uncorrected:", " ".join(f"{d:6.2f}" for d in raw))
    print("  corrected:  ", " ".join(f"{d:6.2f}" for d in fixed))
    print(f"  segment 5 ratio: {raw[-1] / fixed[-1]:.1f}x")
    assert all(a < b for a, b in itertools.pairwise(raw)), raw
    assert raw[-1] > 10
    assert max(fixed) < 2.0, fixed
    assert raw[-1] >= 3 * fixed[-1]


def test_joins_stay_seamless() -> None:
    """The corrected first frame of each segment matches the corrected last frame before
    it; a constant per-segment transform (pooled stats -> reference) would not."""
    reference = colour_stats(start_image())
    segments = chain(correct=True)
    ramp = [drift(colour_stats(b[0]), colour_stats(a[-1])) for a, b in itertools.pairwise(segments)]
    # The alternative, on the same chained input: one transform for the whole segment.
    rng = np.random.default_rng(7)
    constant, previous_last = [], start_image()
    for _ in range(SEGMENTS):
        frames = generate(previous_last, rng)
        pooled = colour_stats(frames)
        frames = [match_colours(f, pooled, reference) for f in frames]
        constant.append(drift(colour_stats(frames[0]), colour_stats(previous_last)))
        previous_last = frames[-1]
    print("\njoin step (Lab units), ramp:    ", " ".join(f"{d:5.2f}" for d in ramp))
    print("join step (Lab units), constant:", " ".join(f"{d:5.2f}" for d in constant[1:]))
    assert max(ramp) < 1.0, ramp
    assert max(ramp) < min(constant[1:]), (ramp, constant)


def test_start_corrects_a_shifted_first_frame() -> None:
    """A model that shifts frame 0 too: with `start`, frame 0 is pulled back to the
    conditioning image and the tail to the reference."""
    rng = np.random.default_rng(3)
    image = start_image()
    reference = colour_stats(image)
    frames = [drifted(image, 1.0 + t / (FRAMES - 1), t, rng) for t in range(FRAMES)]
    assert drift(colour_stats(frames[0]), reference) > 4
    out = list(correct_segment(frames, reference, start=reference))
    assert drift(colour_stats(out[0]), reference) < 1.0
    assert drift(colour_stats(out[-1]), reference) < 1.0


def test_lab_round_trip_within_one_level() -> None:
    levels = np.r_[0:256:5, 255].astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    greys = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rgb = np.concatenate([grid, greys])
    back = lab_to_srgb(srgb_to_lab(rgb))
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1


def test_lab_known_values() -> None:
    rgb = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    expected = [(100, 0, 0), (0, 0, 0), (53.24, 80.09, 67.20), (32.30, 79.19, -107.86)]
    np.testing.assert_allclose(srgb_to_lab(rgb), expected, atol=0.05)


def test_identity_and_zero_strength() -> None:
    image = start_image()
    stats = colour_stats(image)
    same = match_colours(image, stats, stats)
    assert np.abs(same.astype(int) - image.astype(int)).max() <= 1
    other = ColourStats((60.0, 20.0, -10.0), (10.0, 5.0, 5.0))
    assert np.array_equal(match_colours(image, stats, other, strength=0.0), image)
    frames = [image, image]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(correct_segment(frames, other, strength=0.0), frames, strict=True)
    )


def test_flat_segment_does_not_blow_up() -> None:
    rng = np.random.default_rng(1)
    grey = np.clip(128 + rng.normal(0, 0.3, (32, 32, 3)), 0, 255).astype(np.uint8)
    stats, reference = colour_stats(grey), colour_stats(start_image())
    assert max(stats.std) < 0.5
    out = match_colours(grey, stats, reference)
    out_stats = colour_stats(out)
    # Mean moves to the reference; the std grows by at most MAX_SCALE (plus rounding).
    assert np.allclose(out_stats.mean, reference.mean, atol=1.0)
    assert max(out_stats.std) <= MAX_SCALE * 0.5 + 1.0
    # The other way: a flat reference does not squash a colourful frame to one colour.
    squashed = colour_stats(match_colours(start_image(), reference, stats))
    assert squashed.std[0] >= 0.5 * reference.std[0] - 0.5
    assert all(np.isfinite(f).all() for f in correct_segment([grey] * 5, reference))


def test_correct_segment_is_lazy_and_needs_a_reiterable_source() -> None:
    class Source:
        passes = 0

        def __iter__(self) -> Iterator[Frame]:
            Source.passes += 1
            return iter([start_image()] * 3)

    out = correct_segment(Source(), colour_stats(start_image()))
    assert Source.passes == 1  # checked for one-shot-ness only
    next(out)
    assert Source.passes == 3
    assert len(list(out)) == 2
    with pytest.raises(TypeError, match="re-iterable"):
        correct_segment(iter([start_image()]), colour_stats(start_image()))
    with pytest.raises(ValueError, match="strength"):
        match_colours(start_image(), colour_stats(start_image()), colour_stats(start_image()), 2)


def test_fit_segment_stored_as_json_corrects_like_correct_segment() -> None:
    """fit_segment + apply (through a JSON round trip) is correct_segment, exactly."""
    rng = np.random.default_rng(11)
    image = start_image()
    reference = colour_stats(image)
    frames = [drifted(image, 1.0 + t / (FRAMES - 1), t, rng) for t in range(FRAMES)]
    for start in (None, reference):
        expected = list(correct_segment(frames, reference, strength=0.8, start=start))
        fitted = fit_segment(iter(frames), reference, strength=0.8, start=start)  # one pass
        assert fitted.n == FRAMES
        stored = json.loads(json.dumps(fitted.to_dict()))
        restored = SegmentCorrection.from_dict(stored)
        assert restored == fitted
        for t, frame in enumerate(frames):
            assert np.array_equal(restored.apply(frame, t), expected[t])
            assert np.array_equal(fitted.apply(frame, t), expected[t])
        assert np.array_equal(restored.apply_last(frames[-1]), expected[-1])


def test_fit_segment_reads_a_generator_once() -> None:
    reads = []

    def source() -> Iterator[Frame]:
        for t in range(4):
            reads.append(t)
            yield start_image()

    fitted = fit_segment(source(), colour_stats(start_image()))
    assert reads == [0, 1, 2, 3]
    assert fitted.n == 4
    one = fit_segment([start_image()], colour_stats(start_image()))
    assert one.n == 1
    assert np.abs(one.apply_last(start_image()).astype(int) - start_image()).max() <= 1


def test_segment_correction_refuses_bad_input() -> None:
    image = start_image()
    reference = colour_stats(image)
    fitted = fit_segment([image] * 3, reference)
    for t in (-1, 3, 10):
        with pytest.raises(ValueError, match="frame index"):
            fitted.apply(image, t)
    with pytest.raises(ValueError, match="at least one frame"):
        fit_segment([], reference)
    with pytest.raises(ValueError, match="strength"):
        fit_segment([image], reference, strength=1.5)
    with pytest.raises(ValueError, match="6 numbers"):
        SegmentCorrection.from_dict({**fitted.to_dict(), "slope": [0.0] * 5})


def test_fit_segment_at_zero_strength_changes_nothing() -> None:
    image = start_image()
    other = ColourStats((60.0, 20.0, -10.0), (10.0, 5.0, 5.0))
    fitted = fit_segment([image, image], other, strength=0.0)
    out = fitted.apply(image, 0)
    assert np.array_equal(out, image)
    assert out is not image
    assert np.array_equal(fitted.apply_last(image), image)
