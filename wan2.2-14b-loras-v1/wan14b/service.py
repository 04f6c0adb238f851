"""`wan2.2-14b-loras-v1`: Wan2.2 A14B (a high-noise and a low-noise expert) on an embedded
ComfyUI, in three modes (text-to-video, image-to-video, first-last-frame), with the
lightx2v 4-step LoRA pair by default and the caller's own LoRAs per job.

The two experts run as two `KSamplerAdvanced` passes: the high-noise one from step 0 to
`split_step` (returning its leftover noise), the low-noise one from there to the end.
Models are downloaded to MODELS_DIR (the network volume) at start; LoRAs given in a
request are downloaded into the LoRA cache (MODELS_DIR/loras/cache) before the prompt
is queued.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from model_service.api.legacy_video import video_routers
from model_service.comfy.engine import ComfyServiceSpec
from model_service.comfy.workflow import Bind, Graph, Workflow, chain_loras
from model_service.longvideo.spec import LongVideoSpec
from model_service.service import ServiceSpec
from model_service.video_size import fit_to_area, size_for_image
from wan14b import legacy
from wan14b.schema import Wan14bInput

HERE = Path(__file__).parent
MANIFEST = HERE / "manifest.json"

# node ids shared by the three workflow files
HIGH_UNET, LOW_UNET, HIGH_LIGHTNING, LOW_LIGHTNING, HIGH_SHIFT, LOW_SHIFT = (
    "1", "2", "3", "4", "5", "6",
)  # fmt: skip

BINDINGS: dict[str, str | Bind] = {
    "prompt": "8.text",
    "negative_prompt": "9.text",
    "seed": Bind("13.noise_seed", "14.noise_seed"),
    "steps": Bind("13.steps", "14.steps"),
    "split_step": Bind("13.end_at_step", "14.start_at_step"),
    "cfg": Bind("13.cfg", "14.cfg"),
    "shift": Bind("5.shift", "6.shift"),
    "width": "12.width",
    "height": "12.height",
    "num_frames": "12.length",
    "fps": Bind("16.fps", convert=float),
}


def apply_loras(graph: Graph, values: Mapping[str, Any]) -> None:
    """Without `lightning`, or with the distill pair (which comes as job LoRAs), the
    built-in 4-step LoRAs leave the graph; the job's own LoRAs (their ComfyUI names filled
    in by the engine) are chained onto the expert they apply to."""
    high, low = HIGH_LIGHTNING, LOW_LIGHTNING
    if not values.get("lightning", True) or values.get("lightning_loras") == "distill":
        del graph[HIGH_LIGHTNING], graph[LOW_LIGHTNING]
        high, low = HIGH_UNET, LOW_UNET
    loras = values.get("loras") or []
    for expert, source, target in (("high", high, HIGH_SHIFT), ("low", low, LOW_SHIFT)):
        chosen = [
            (str(lora["lora_name"]), float(lora["strength"]))
            for lora in loras
            if lora["applies_to"] in (expert, "both")
        ]
        chain_loras(graph, source, (target, "model"), chosen)


def _workflow(mode: str, media: dict[str, str]) -> Workflow:
    bind = dict(BINDINGS)
    for field_name, target in media.items():
        bind[field_name] = Bind(target, media="image")
    return Workflow.load(
        HERE / "workflows" / f"wan14b_{mode}.json",
        bind=bind,
        outputs={"17": "video"},
        name=mode,
        adjust=apply_loras,
    )


T2V = _workflow("t2v", {})
I2V = _workflow("i2v", {"start_image": "11.image"})
FLF = _workflow("flf", {"start_image": "11.image", "end_image": "18.image"})


# No size given and a start image: the video takes the image's shape at the 480p budget
# (Wan2.2 A14B image2video: max_area 832x480, sides multiples of 16), not a landscape crop.
SIZE_FROM_IMAGE = size_for_image("start_image", 832 * 480, 16, 1280, fit_to_area)


def choose(values: Mapping[str, Any]) -> str:
    if values.get("start_image") is None:
        return "t2v"
    return "flf" if values.get("end_image") is not None else "i2v"


def warmup_input(scratch: Path) -> dict[str, Any]:
    """The warm-up job (WARMUP): image-to-video (what every segment of a chain or travel
    runs) at the smallest size, 5 frames, 2 steps split 1 + 1, so both experts run. It
    loads the files an i2v job uses (both i2v experts with the built-in lightning LoRAs,
    the UMT5 text encoder, the VAE) with the same loader inputs, so ComfyUI keeps them
    loaded and its loader nodes cached; a text-to-video job loads its own two experts."""
    image = scratch / "start.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(image)
    values = Wan14bInput(prompt="warm-up", width=64, height=64, num_frames=5, steps=2, seed=0)
    return {**values.model_dump(mode="json"), "start_image": str(image)}


SERVICE = ServiceSpec(
    name="wan2.2-14b-loras-v1",
    title="Wan2.2-14B with LoRAs",
    version="0.1.0",
    description=(
        "Wan2.2 A14B (two experts) on an embedded ComfyUI: text-to-video, image-to-video "
        "and first-last-frame, 4 steps with the lightx2v LoRAs, plus your own LoRAs per "
        "job; h264 mp4 out."
    ),
    default_port=8189,
    input_model=Wan14bInput,
    predictor=None,
    min_vram_gb=24.0,  # fp8 experts, one resident at a time; 48 GB+ keeps both loaded
    extra_routes=video_routers(legacy.GenerateRequest, legacy.to_input),
    comfy=ComfyServiceSpec(
        workflows={"t2v": T2V, "i2v": I2V, "flf": FLF},
        choose=choose,
        manifest=MANIFEST,
        download_at_start=True,
        lora_field="loras",
        lora_base="Wan2.2 A14B",
        derive=SIZE_FROM_IMAGE,
        warmup_input=warmup_input,
    ),
    long_video=LongVideoSpec(
        image_field="start_image", end_image_field="end_image", size_from_image=SIZE_FROM_IMAGE
    ),
)
