"""What an image-to-video service declares to offer long videos."""

from __future__ import annotations

from dataclasses import dataclass

MAX_PARTS = 50  # segments of a chain, legs of a travel


@dataclass(frozen=True)
class LongVideoSpec:
    image_field: str = "start_image"  # the first frame of a part
    # the last frame, for first-last-frame models: travel legs then land on each image
    end_image_field: str | None = None
    frames_field: str = "num_frames"
    # fields a chain's segment may set for itself (when the service's input has them)
    segment_fields: tuple[str, ...] = ("prompt", "negative_prompt", "num_frames", "seed", "loras")
