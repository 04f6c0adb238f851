"""The Qwen-Image-Edit predictor: loaded by import path inside the worker process."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image, ImageOps

from model_service.errors import InvalidInput, LoraInvalid, OutOfMemory, SetupFailed
from model_service.predictor import JobContext, PredictResult, SetupResult, WorkerConfig

from . import hires, inpaint, job_loras, references
from .manifest import ModelVariant, parse_model_variant
from .pipeline_loader import NUNCHAKU_FP4, NUNCHAKU_INT4, LoadedPipeline, load_pipeline
from .schema import HIRES_DENOISE, HIRES_STEPS, MASK_FEATHER
from .service import lora_refusal

_PIL_FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp")}
_LOSSY_QUALITY = 95
DECODED_IMAGES = "decoded_images"  # the inputs' key for `prepare`'s opened images
INPAINT = "inpaint"  # the inputs' key for `prepare`'s inpaint (input image and blend)


class QwenImageEditPredictor:
    """Edit images with Qwen-Image-Edit (`edit`), Edit-2509 (`edit-2509`) or Edit-2511
    (`edit-2511`), each with or without Lightning (`...-lightning-4`, `...-lightning-8`)."""

    def __init__(self) -> None:
        self._loaded: LoadedPipeline | None = None
        self._config: WorkerConfig | None = None
        self._fetcher: job_loras.LoraFetcher | None = None  # built by the first LoRA job
        self._fetcher_lock = threading.Lock()

    def setup(self, config: WorkerConfig) -> SetupResult:
        try:
            choice = parse_model_variant(config.options.get("model_variant"))
        except ValueError as exc:
            raise SetupFailed(str(exc)) from None
        loaded = self._loaded = load_pipeline(config, choice)
        self._config = config
        return SetupResult(
            info={
                "variant": choice.name,
                "model": choice.variant.hf_repo,
                "pipeline_class": type(loaded.pipe).__name__,
                "transformer_kind": loaded.transformer_kind,
                "weights": loaded.weights,
                "lightning": loaded.lightning,
                "scheduler": loaded.scheduler,
                "offload": loaded.offload,
                "device": loaded.device,
                "reason": loaded.reason,
                "tiny": loaded.tiny,
                "max_input_images": choice.variant.max_input_images,
                "default_steps": loaded.default_steps,
                "default_true_cfg_scale": loaded.default_true_cfg_scale,
                "torch_version": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "diffusers_version": diffusers.__version__,
                "job_loras": _lora_refusal(loaded) is None,
            }
        )

    def prepare(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Open and decode the input images and fetch the job's LoRAs into the cache
        (CPU and network work, while the previous job runs)."""
        loaded = self._require_loaded()
        refs = references.of_inputs(inputs)
        images = _open_images(_image_paths(inputs) + [ref.path for ref in refs], loaded.variant)
        for index, ref in enumerate(refs, start=len(images) - len(refs)):
            images[index] = references.scaled(images[index], ref.strength)
        masked: inpaint.Inpaint | None = None
        if inputs.get("mask"):
            with Image.open(inputs["mask"]) as mask:
                feather = int(inputs.get("mask_feather", MASK_FEATHER))
                images[0], masked = inpaint.prepare(images[0], mask, feather)
        if inputs.get(job_loras.FIELD):
            self._lora_fetcher(loaded).prefetch(inputs[job_loras.FIELD])
        return inputs | {DECODED_IMAGES: images, INPAINT: masked}

    def predict(self, inputs: dict[str, Any], ctx: JobContext) -> PredictResult:
        """The edit on the GPU; the images are encoded and written by `finish`."""
        loaded = self._require_loaded()
        if DECODED_IMAGES not in inputs:  # called without `prepare`
            inputs = self.prepare(inputs)
        images = inputs[DECODED_IMAGES]
        steps = int(inputs.get("steps") or loaded.default_steps)
        cfg = inputs.get("true_cfg_scale")
        cfg = loaded.default_true_cfg_scale if cfg is None else float(cfg)
        ctx.check_canceled()
        masked: inpaint.Inpaint | None = inputs.get(INPAINT)
        second = _hires_of(inputs)
        total = steps + (second.steps if second else 0)
        kwargs = _call_kwargs(inputs, images, loaded, steps, cfg, ctx, total)
        refs = references.of_inputs(inputs)
        if refs:  # they are the last pictures the model gets
            first = len(images) - len(refs) + 1
            kwargs["prompt"] = references.completed_prompt(inputs["prompt"], refs, first)
            if kwargs["width"] is None:  # the last input image's aspect, not a reference's
                width, height = images[first - 2].size
                kwargs["width"], kwargs["height"] = inpaint.model_size(width / height)
        if masked is not None and kwargs["width"] is None:
            # the edited image's aspect (not the last input's, as the pipeline would)
            width, height = masked.original.size
            kwargs["width"], kwargs["height"] = inpaint.model_size(width / height)
        loras = inputs.get(job_loras.FIELD) or []
        try:
            with contextlib.ExitStack() as scope:
                if loras:
                    held = scope.enter_context(self._lora_fetcher(loaded).hold(loras))
                    scope.enter_context(job_loras.applied(loaded.pipe, held))
                outputs = loaded(**kwargs)
                if second is not None:
                    outputs = loaded(**_second_pass(kwargs, second, outputs, loaded, ctx, total))
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise OutOfMemory(
                "the GPU ran out of memory during the edit; try fewer input images, a "
                "smaller width/height, or fewer images per request (num_images)"
            ) from exc
        output_format = inputs.get("output_format") or "png"
        width, height = outputs[0].size
        if masked is not None and inputs.get("width") is None:  # at the input's size
            width, height = masked.original.size
            if second is not None:
                width, height = round(width * second.scale), round(height * second.scale)
        return PredictResult(
            outputs=_output_names(len(outputs), output_format),
            info={"width": width, "height": height, "steps": steps, "true_cfg_scale": cfg}
            | ({"loras": len(loras)} if loras else {})
            | ({"inpaint": {"mask_feather": masked.feather}} if masked else {})
            | ({"hires": asdict(second)} if second else {})
            | (_references_info(refs, kwargs["prompt"]) if refs else {}),
            finish=partial(_save, outputs, ctx.output_dir, output_format, masked, (width, height)),
        )

    def _lora_fetcher(self, loaded: LoadedPipeline) -> job_loras.LoraFetcher:
        """The LoRA cache, for a transformer that takes job LoRAs (else `LoraInvalid`)."""
        refusal = _lora_refusal(loaded)
        if refusal is not None:
            raise LoraInvalid(refusal, field=f"input.{job_loras.FIELD}")
        with self._fetcher_lock:
            if self._fetcher is None:
                assert self._config is not None
                self._fetcher = job_loras.LoraFetcher(
                    Path(self._config.models_dir), self._config.options
                )
            return self._fetcher

    def _require_loaded(self) -> LoadedPipeline:
        if self._loaded is None:
            raise RuntimeError("predict() called before setup()")
        return self._loaded


def _lora_refusal(loaded: LoadedPipeline) -> str | None:
    """Why this transformer takes no job LoRAs (service.lora_refusal), or None."""
    if loaded.transformer_kind not in (NUNCHAKU_INT4, NUNCHAKU_FP4):
        return None
    return lora_refusal(loaded.transformer_kind)


def _image_paths(inputs: dict[str, Any]) -> list[str]:
    paths = inputs.get("images") or ([inputs["image"]] if inputs.get("image") else [])
    if not paths:
        raise InvalidInput("give an input image in `image` or `images`", field="images")
    return [str(p) for p in paths]


def _open_images(paths: list[str], variant: ModelVariant) -> list[Image.Image]:
    if len(paths) > variant.max_input_images:
        raise InvalidInput(
            f"model {variant.name} takes at most {variant.max_input_images} input image(s), "
            f"got {len(paths)}; use the edit-2509 or edit-2511 model for up to 3",
            field="images",
        )
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(ImageOps.exif_transpose(image).convert("RGB"))
    return images


def _progress(ctx: JobContext, done_before: int, total: int) -> Callable[..., dict[str, Any]]:
    """The pipeline's step callback: the job's progress over both passes."""

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        ctx.progress(done_before + step + 1, total)  # raises JobCanceled: let it go
        return tensors

    return on_step_end


def _references_info(refs: list[references.Reference], prompt: str) -> dict[str, Any]:
    """What the job's references did: each one's role and strength, the prompt used."""
    used = [{"role": ref.role, "strength": ref.strength} for ref in refs]
    return {"references": used, "prompt": prompt}


def _hires_of(inputs: dict[str, Any]) -> hires.Hires | None:
    if not inputs.get("hires_scale"):
        return None
    return hires.Hires(
        float(inputs["hires_scale"]),
        int(inputs.get("hires_steps") or HIRES_STEPS),
        float(inputs.get("hires_denoise") or HIRES_DENOISE),
    )


def _second_pass(
    first: dict[str, Any],
    second: hires.Hires,
    images: list[Image.Image],
    loaded: LoadedPipeline,
    ctx: JobContext,
    total: int,
) -> dict[str, Any]:
    """The hires pass's arguments: the first pass's, at the larger size, from its images
    upscaled and noised (`hires.Hires`), over the schedule's last steps."""
    ctx.check_canceled()
    width, height = second.size(*images[0].size)
    return first | {
        "width": width,
        "height": height,
        "num_inference_steps": second.steps,
        "sigmas": second.schedule(),
        "latents": second.start_latents(loaded.pipe, images, first["generator"]),
        "callback_on_step_end": _progress(ctx, total - second.steps, total),
    }


def _call_kwargs(
    inputs: dict[str, Any],
    images: list[Image.Image],
    loaded: LoadedPipeline,
    steps: int,
    cfg: float,
    ctx: JobContext,
    total: int,
) -> dict[str, Any]:
    return {
        # Edit takes one image; Edit Plus a list of up to three.
        "image": images if loaded.variant.max_input_images > 1 else images[0],
        "prompt": inputs["prompt"],
        # true CFG needs a negative prompt; at cfg 1 it would only trigger a warning
        "negative_prompt": (inputs.get("negative_prompt") or " ") if cfg > 1 else None,
        "num_inference_steps": steps,
        "true_cfg_scale": cfg,
        "num_images_per_prompt": int(inputs.get("num_images") or 1),
        "height": inputs.get("height"),
        "width": inputs.get("width"),
        "generator": torch.Generator(device=loaded.device).manual_seed(ctx.seed),
        "callback_on_step_end": _progress(ctx, 0, total),
    }


def _output_names(count: int, output_format: str) -> list[str]:
    _, ext = _PIL_FORMATS[output_format]
    return [f"output_{i}.{ext}" for i in range(count)]


def _save(
    images: list[Image.Image],
    output_dir: Path,
    output_format: str,
    masked: inpaint.Inpaint | None = None,
    size: tuple[int, int] | None = None,
) -> None:
    """Encode and write the images (an inpaint's blended over its input first, at `size`)."""
    if masked is not None:
        images = [masked.blend(image, size) for image in images]
    pil_format, _ = _PIL_FORMATS[output_format]
    options: dict[str, Any] = {} if pil_format == "PNG" else {"quality": _LOSSY_QUALITY}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, _output_names(len(images), output_format), strict=True):
        image.save(Path(output_dir) / name, format=pil_format, **options)
