"""Input checks every video service shares: the frame size (a preset, or width and
height) and the frame count that Wan's VAE accepts (4n+1). Raise ValueError, which the
input models turn into a 422 naming the field."""

from __future__ import annotations

from collections.abc import Mapping


def resolve_size(
    preset: str | None,
    width: int | None,
    height: int | None,
    presets: Mapping[str, tuple[int, int]],
    default: tuple[int, int],
    max_pixels: int,
    hint: str,
) -> tuple[int, int]:
    """(width, height) from a preset, both sides, or the default; at most `max_pixels`."""
    if preset is not None:
        if width is not None or height is not None:
            raise ValueError("give `preset`, or `width` and `height`, not both")
        width, height = presets[preset]
    elif (width is None) != (height is None):
        raise ValueError("give both `width` and `height`, or neither")
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
