"""Video post-processing on CPU (PyAV): stitching segments into long videos."""

from __future__ import annotations

from model_service.video.stitch import (
    AudioFacts,
    StitchResult,
    VideoFacts,
    probe,
    replace_audio,
    stitch_chain,
    stitch_pieces,
    stitch_travel,
)

__all__ = [
    "AudioFacts",
    "StitchResult",
    "VideoFacts",
    "probe",
    "replace_audio",
    "stitch_chain",
    "stitch_pieces",
    "stitch_travel",
]
