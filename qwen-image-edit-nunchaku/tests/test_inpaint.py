"""Inpaint: the mask's blend weights, the green composite and the size the model works at
(pure image code); the pixels outside the mask through the tiny pipeline and over HTTP
are in test_pipeline.py and test_service.py."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from PIL import Image

from qwen_image_edit import inpaint


def rectangle_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def chebyshev_distance(mask: np.ndarray) -> np.ndarray:
    """Each pixel's Chebyshev distance to the nearest True pixel (brute force)."""
    ys, xs = np.nonzero(mask)
    grid_y, grid_x = np.indices(mask.shape)
    distance = np.full(mask.shape, np.inf)
    for y, x in zip(ys, xs, strict=True):
        distance = np.minimum(distance, np.maximum(abs(grid_y - y), abs(grid_x - x)))
    return distance


@pytest.mark.parametrize("feather", [0, 2, 8])
def test_blend_weights_are_full_on_the_mask_and_none_beyond_the_feather(feather: int) -> None:
    mask = rectangle_mask((40, 30), (10, 8, 18, 14))
    alpha = np.asarray(inpaint.feathered_alpha(mask, feather))
    distance = chebyshev_distance(np.asarray(mask) > 0)
    assert (alpha[distance == 0] == 255).all()
    assert (alpha[distance > feather] == 0).all()
    if feather:
        ramp = [int(alpha[distance == d].max()) for d in range(feather + 1)]
        assert ramp == sorted(ramp, reverse=True)  # fades outwards
        assert 0 < ramp[feather // 2] < 255  # and is a ramp, not a step


def test_a_mask_at_the_border_stays_full_there() -> None:
    alpha = np.asarray(inpaint.feathered_alpha(rectangle_mask((20, 20), (0, 0, 6, 20)), 4))
    assert (alpha[:, :6] == 255).all()


def test_an_odd_feather_is_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        inpaint.feathered_alpha(rectangle_mask((8, 8), (0, 0, 4, 4)), 3)


def test_the_mask_is_scaled_to_the_image_and_thresholded_above_128() -> None:
    mask = Image.new("L", (10, 5), 128)  # not above the threshold
    mask.paste(129, (0, 0, 5, 5))
    binary = inpaint.binary_mask(mask, (20, 10))
    assert binary.size == (20, 10)
    values = np.asarray(binary)
    assert set(np.unique(values)) == {0, 255}
    assert (values[:, :9] == 255).all()
    assert (values[:, 11:] == 0).all()


def test_the_model_sees_the_masked_area_pure_green() -> None:
    image = Image.new("RGB", (16, 16), (200, 30, 40))
    composite = np.asarray(inpaint.green_composite(image, rectangle_mask((16, 16), (4, 4, 8, 8))))
    assert (composite[4:8, 4:8] == [0, 255, 0]).all()
    assert (composite[:4] == [200, 30, 40]).all()
    assert (composite[8:] == [200, 30, 40]).all()


def test_blend_keeps_the_input_outside_and_the_model_inside() -> None:
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    mask = rectangle_mask((40, 30), (10, 8, 18, 14))
    _, masked = inpaint.prepare(original, mask, 4)
    generated = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    out = np.asarray(masked.blend(generated))
    distance = chebyshev_distance(np.asarray(mask) > 0)
    assert (out[distance > 4] == np.asarray(original)[distance > 4]).all()
    assert (out[distance == 0] == np.asarray(generated)[distance == 0]).all()
    # the model's picture at another size: scaled to the input's, or to the caller's size
    assert masked.blend(generated.resize((80, 60))).size == (40, 30)
    assert masked.blend(generated, (80, 64)).size == (80, 64)


@pytest.mark.parametrize("size", [(1000, 750), (480, 832), (64, 48), (1920, 1080)])
def test_model_size_is_the_edit_pipelines_own(size: tuple[int, int]) -> None:
    aspect = size[0] / size[1]
    assert inpaint.model_size(aspect) == tuple(calculate_dimensions(1024 * 1024, aspect))
