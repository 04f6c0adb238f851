"""The two FastWan2.2-5B services: one code, two images.

- `fastwan2.2-5b-network-storage`: downloads missing model files to MODELS_DIR (the
  RunPod network volume) at start, then loads them;
- `fastwan2.2-5b-packed`: the image has the files (downloaded at build time with the
  same manifest and `model-service download`); nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastwan import legacy
from fastwan.schema import FastWanInput
from model_service.api.legacy_video import video_routers
from model_service.comfy.engine import ComfyServiceSpec
from model_service.comfy.workflow import Bind, Graph, Workflow, chain_loras
from model_service.longvideo.spec import LongVideoSpec
from model_service.service import ServiceSpec
from model_service.video_size import best_output_size, size_for_image

HERE = Path(__file__).parent
MANIFEST = HERE / "manifest.json"

UNET, SHIFT = "37", "48"  # UNETLoader, ModelSamplingSD3 of the workflow file


def apply_loras(graph: Graph, values: Mapping[str, Any]) -> None:
    """The job's LoRAs (their ComfyUI names filled in by the engine) as a chain of
    LoraLoaderModelOnly between the UNETLoader and ModelSamplingSD3: where ComfyUI's Wan2.2
    templates put a model LoRA (comfyui-workflow-templates-json video_wan2_2_14B_i2v.json:
    UNETLoader 95 -> LoraLoaderModelOnly 101 -> (lightning switch) -> ModelSamplingSD3 103;
    the 5B template, video_wan2_2_5B_ti2v.json, has UNETLoader 37 -> ModelSamplingSD3 48
    and no LoRA; research/model-stacks.md 1: UNETLoader -> optional LoraLoaderModelOnly
    -> ModelSamplingSD3 -> sampler)."""
    loras = values.get("loras") or []
    if loras:
        chosen = [(str(lora["lora_name"]), float(lora["strength"])) for lora in loras]
        chain_loras(graph, UNET, (SHIFT, "model"), chosen)


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
    adjust=apply_loras,
)


def _choose(values: Any) -> str:
    return "ti2v"


# No size given and a start image: the video takes the image's shape at the 720p budget
# (Wan2.2 TI2V-5B: max_area 1280x704, sides multiples of 32), instead of a landscape crop.
SIZE_FROM_IMAGE = size_for_image("start_image", 1280 * 704, 32, 1280, best_output_size)


def warmup_input(scratch: Path) -> dict[str, Any]:
    """The warm-up job (WARMUP): text-to-video at the smallest size and length. It loads
    the three files every job uses (TI2V-5B serves text- and image-to-video alike, the
    UMT5 text encoder, the Wan2.2 VAE) with the same loader inputs, so ComfyUI keeps them
    loaded and its loader nodes cached for the first job; the size only scales the
    activations."""
    values = FastWanInput(prompt="warm-up", width=64, height=64, num_frames=5, seed=0)
    return values.model_dump(mode="json")


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
            warmup_input=warmup_input,
            lora_field="loras",
            lora_base="Wan2.2 TI2V-5B",
        ),
        long_video=LongVideoSpec(image_field="start_image", size_from_image=SIZE_FROM_IMAGE),
    )


NETWORK_STORAGE = _spec(
    "fastwan2.2-5b-network-storage", True, "FastWan2.2-5B (models on network storage)"
)
PACKED = _spec("fastwan2.2-5b-packed", False, "FastWan2.2-5B (models in the image)")
