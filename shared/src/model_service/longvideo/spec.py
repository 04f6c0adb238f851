"""What an image-to-video service declares to offer long videos."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from model_service.video_size import frame_count_at_least

MAX_PARTS = 50  # segments of a chain, legs of a travel, clips of a join


@dataclass(frozen=True)
class LongVideoSpec:
    image_field: str = "start_image"  # the first frame of a part
    # the last frame, for first-last-frame models: travel legs then land on each image
    end_image_field: str | None = None
    frames_field: str = "num_frames"
    # fields a chain's segment may set for itself (when the service's input has them)
    segment_fields: tuple[str, ...] = ("prompt", "negative_prompt", "num_frames", "seed", "loras")
    # the service's size-from-image rule (values with the image's local path -> width and
    # height, or {} when a size was given): applied once to the first image, so every part
    # of a long video has the same size
    size_from_image: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    # the smallest frame count the model makes of at least n (Wan's VAE: 4n+1): a join's
    # bridge or a redo's stretch is generated with it, then picked down to its length
    frames_at_least: Callable[[int], int] = frame_count_at_least
