"""The service's declaration: the shared library builds the API and worker from it."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model_service.errors import InvalidInput
from model_service.service import ServiceSpec
from model_service.settings import Settings
from qwen_image_edit import legacy
from qwen_image_edit.manifest import get_variant, parse_model_variant
from qwen_image_edit.schema import QwenEditInput


def _check_input(data: QwenEditInput, settings: Settings) -> None:
    variant = get_variant(settings.model_variant)
    count = len(data.images or [])
    if count > variant.max_input_images:
        raise InvalidInput(
            f"input.images: the {variant.name} model takes {variant.max_input_images} "
            f"image(s), got {count}; send one image or run MODEL_VARIANT=edit-2509 or "
            "edit-2511",
            field="input.images",
        )
    if data.references and count + len(data.references) > variant.max_input_images:
        raise InvalidInput(
            f"input.references: the {variant.name} model takes {variant.max_input_images} "
            f"image(s) in all, got {count} and {len(data.references)} reference(s); "
            "run MODEL_VARIANT=edit-2509 or edit-2511 for references",
            field="input.references",
        )


def lora_refusal(transformer_kind: str) -> str:
    """Why the loaded transformer takes no job LoRAs: Nunchaku's 4-bit transformer
    (NunchakuQwenImageTransformer2DModel) is no diffusers PEFT model and its released
    versions have no LoRA API for Qwen-Image (nunchaku-tech/nunchaku#754, closed
    unmerged; ComfyUI-nunchaku#704: "Not yet")."""
    return (
        f"input.loras: this service runs Nunchaku's 4-bit Qwen-Image transformer "
        f"({transformer_kind}), which cannot take LoRAs; send the job without `loras`, or "
        "run the service with the bf16 transformer (a GPU Nunchaku does not support, such "
        "as H100/H200, or MODELS_DIR without the Nunchaku file)"
    )


def _check_against_model(data: QwenEditInput, info: Mapping[str, Any]) -> None:
    """Once the worker is up: LoRAs on a transformer that takes none are a 422 (the
    worker refuses them too, for a job sent before it was up)."""
    if data.loras and info.get("job_loras") is False:
        kind = str(info.get("transformer_kind"))
        raise InvalidInput(lora_refusal(kind), field="input.loras")


def _models_root(settings: Settings) -> Path:
    base = settings.models_dir.absolute()
    return base / "tiny" if settings.profile == "tiny" else base


def _worker_options(settings: Settings) -> dict[str, Any]:
    # MODEL_VARIANT carries the Lightning choice too (`edit-2509-lightning-8`): the shared
    # settings have no field of the service's own, and a fleet keys its queue by it.
    return {
        "model_variant": parse_model_variant(settings.model_variant).name,
        "cpu_offload": settings.cpu_offload,
        # the job LoRAs' cache and where they may come from (qwen_image_edit.job_loras);
        # the cache's folder as on the ComfyUI services (`loras/cache` under MODELS_DIR,
        # or its `tiny` folder in PROFILE=tiny), so `GET /v1/loras` lists it
        "lora_cache_dir": str(_models_root(settings) / "loras" / "cache"),
        "lora_cache_gb": settings.lora_cache_gb,
        "fetch_allow_networks": [str(n) for n in settings.fetch_allow_networks],
        "hf_endpoint": settings.hf_endpoint,
    }


SPEC = ServiceSpec(
    name="qwen-image-edit-nunchaku",
    title="Qwen-Image-Edit",
    version="0.1.0",
    description=(
        "Edit images with a prompt: Qwen-Image-Edit, Edit-2509 and Edit-2511 (up to 3 input "
        "images) on a diffusers pipeline, with Nunchaku 4-bit weights where the GPU supports "
        "them, and optionally Lightning (4 or 8 steps)."
    ),
    default_port=8000,
    input_model=QwenEditInput,
    predictor="qwen_image_edit.predictor:QwenImageEditPredictor",
    min_vram_gb=get_variant(None).min_vram_gb_nunchaku,
    worker_options=_worker_options,
    check_input=_check_input,
    check_against_model=_check_against_model,
    extra_routes=legacy.routers,
)
