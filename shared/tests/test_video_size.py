"""Video size from a start image: the model authors' own rules (Wan2.2), so a portrait
photo becomes a portrait video instead of a centre-cropped landscape one."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from model_service.longvideo.bridges import inner_frames
from model_service.video_size import (
    best_output_size,
    fit_to_area,
    frame_count_at_least,
    resolve_size,
    size_for_image,
)

FIVE_B = 1280 * 704  # Wan2.2 TI2V-5B i2v max_area (wan/textimage2video.py)
A14B_480P = 832 * 480  # Wan2.2 A14B i2v at 480p (wan/configs: 480*832)
IMAGES = [(1920, 1080), (1080, 1920), (1000, 1000), (3000, 2000), (600, 1400), (1280, 704)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1280, 704), (1280, 704)),  # the preset sizes come back unchanged
        ((704, 1280), (704, 1280)),
        ((1920, 1080), (1248, 704)),  # 16:9: the closer of 1248x704 and 1280x704
        ((1080, 1920), (704, 1248)),
    ],
)
def test_best_output_size_known_values(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert best_output_size(size, FIVE_B, 32) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1920, 1080), (832, 464)), ((1080, 1920), (464, 832)), ((832, 480), (832, 480))],
)
def test_fit_to_area_known_values(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit_to_area(size, A14B_480P, 16) == expected


@pytest.mark.parametrize("rule", [best_output_size, fit_to_area])
@pytest.mark.parametrize("size", IMAGES)
def test_sizes_keep_the_shape_within_the_budget(rule, size: tuple[int, int]) -> None:
    for pixels, multiple in ((FIVE_B, 32), (A14B_480P, 16)):
        width, height = rule(size, pixels, multiple)
        assert width % multiple == height % multiple == 0
        assert width * height <= pixels
        assert width * height > 0.85 * pixels  # not needlessly small
        assert (width >= height) == (size[0] >= size[1])  # portrait stays portrait
        assert abs((width / height) / (size[0] / size[1]) - 1) < 0.08


def test_nothing_given_with_an_image_leaves_the_size_to_the_image() -> None:
    args = ({"p": (64, 64)}, (1280, 704), FIVE_B, "hint")
    assert resolve_size(None, None, None, *args, image_decides=True) == (None, None)
    assert resolve_size(None, None, None, *args) == (1280, 704)
    assert resolve_size("p", None, None, *args, image_decides=True) == (64, 64)
    assert resolve_size(None, 96, 64, *args, image_decides=True) == (96, 64)


def test_the_derive_hook_reads_the_image_only_when_no_size_was_given(tmp_path: Path) -> None:
    image = tmp_path / "portrait.png"
    Image.new("RGB", (480, 832)).save(image)
    derive = size_for_image("start_image", FIVE_B, 32, 1280, best_output_size)
    assert derive({"start_image": str(image), "width": None}) == {"width": 704, "height": 1248}
    assert derive({"start_image": str(image), "width": 64, "height": 64}) == {}
    assert derive({"start_image": None, "width": None}) == {}


def test_frame_count_at_least_is_the_next_4n_plus_1() -> None:
    assert [frame_count_at_least(n) for n in range(1, 11)] == [1, 5, 5, 5, 5, 9, 9, 9, 9, 13]


def test_inner_frames_spread_evenly_and_are_exact_when_they_fit() -> None:
    assert inner_frames(9, 7) == [1, 2, 3, 4, 5, 6, 7]  # 7 + 2 = 9: every inner frame
    assert inner_frames(9, 5) == [1, 3, 4, 5, 7]
    assert inner_frames(5, 1) == [2]
    with pytest.raises(ValueError, match="cannot hold"):
        inner_frames(5, 4)
