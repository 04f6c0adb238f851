"""Video post-processing on CPU (PyAV): stitching segments into long videos."""

from __future__ import annotations

from model_service.video.stitch import (
    AudioFacts,
    StitchResult,
    VideoFacts,
    probe,
    stitch_chain,
    stitch_travel,
)

__all__ = ["AudioFacts", "StitchResult", "VideoFacts", "probe", "stitch_chain", "stitch_travel"]
