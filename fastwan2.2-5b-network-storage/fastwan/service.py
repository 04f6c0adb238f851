"""The two FastWan2.2-5B services: one code, two images.

- `fastwan2.2-5b-network-storage`: downloads missing model files to MODELS_DIR (the
  RunPod network volume) at start, then loads them;
- `fastwan2.2-5b-packed`: the image has the files (downloaded at build time with the
  same manifest and `model-service download`); nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastwan import legacy
from fastwan.schema import FastWanInput
from model_service.api.legacy_video import video_routers
from model_service.comfy.engine import ComfyServiceSpec
from model_service.comfy.workflow import Bind, Workflow
from model_service.longvideo.spec import LongVideoSpec
from model_service.service import ServiceSpec
from model_service.video_size import best_output_size, size_for_image

HERE = Path(__file__).parent
MANIFEST = HERE / "manifest.json"

TI2V = Workflow.load(
    HERE / "workflows" / "fastwan_ti2v.json",
    bind={
        "prompt": "6.text",
        "negative_prompt": "7.text",
        "seed": "60.noise_seed",
        "cfg": "61.cfg",
        "width": "55.width",
        "height": "55.height",
        "num_frames": "55.length",
        "fps": Bind("57.fps", convert=float),
        "start_image": Bind("56.image", media="image"),
    },
    only_when={"56": "start_image"},  # no start image: text-to-video
    outputs={"58": "video"},
    name="ti2v",
)


def _choose(values: Any) -> str:
    return "ti2v"


# No size given and a start image: the video takes the image's shape at the 720p budget
# (Wan2.2 TI2V-5B: max_area 1280x704, sides multiples of 32), instead of a landscape crop.
SIZE_FROM_IMAGE = size_for_image("start_image", 1280 * 704, 32, 1280, best_output_size)


def _spec(name: str, download_at_start: bool, title: str) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        title=title,
        version="0.1.0",
        description=(
            "FastWan2.2-TI2V-5B (DMD-distilled: 3 steps at FastVideo's own timesteps) on an "
            "embedded ComfyUI: text-to-video, or image-to-video with a start image; h264 mp4 out."
        ),
        default_port=8189,
        input_model=FastWanInput,
        predictor=None,
        min_vram_gb=8.0,  # ComfyUI's own offloading; 24 GB runs 720p more comfortably
        extra_routes=video_routers(legacy.GenerateRequest, legacy.to_input),
        comfy=ComfyServiceSpec(
            workflows={"ti2v": TI2V},
            choose=_choose,
            manifest=MANIFEST,
            download_at_start=download_at_start,
            derive=SIZE_FROM_IMAGE,
        ),
        long_video=LongVideoSpec(image_field="start_image", size_from_image=SIZE_FROM_IMAGE),
    )


NETWORK_STORAGE = _spec(
    "fastwan2.2-5b-network-storage", True, "FastWan2.2-5B (models on network storage)"
)
PACKED = _spec("fastwan2.2-5b-packed", False, "FastWan2.2-5B (models in the image)")
