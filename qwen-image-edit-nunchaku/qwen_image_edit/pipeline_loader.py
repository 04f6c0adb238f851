"""Load the Qwen-Image-Edit diffusers pipeline for a worker: which transformer, which offload.

Profile `tiny`: the random-weight folder from `tiny_model`, float32 on CPU.
Profile `full`: the local copy of the HF repo under MODELS_DIR, bf16, with Nunchaku's
4-bit transformer where its kernels run (a supported GPU, `import nunchaku`, and a
Nunchaku file for the model), else diffusers' bf16 transformer; CPU offload chosen from
the free VRAM unless the worker option `cpu_offload` (setting CPU_OFFLOAD) names one.
Lightning (MODEL_VARIANT `...-lightning-4|8`): Lightning's scheduler, and on Nunchaku its
fused Lightning transformer, on bf16 (and tiny) lightx2v's LoRA fused into the
transformer. Nothing is ever downloaded here and nothing is faked: missing files raise
`SetupFailed` naming them.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from model_service.errors import SetupFailed
from model_service.predictor import WorkerConfig

from .job_loras import misfit
from .manifest import (
    LIGHTNING_DIRNAME,
    LIGHTNING_SCHEDULER_CONFIG,
    NUNCHAKU_COMPUTE_CAPABILITIES,
    NUNCHAKU_DEFAULT_RANK,
    NUNCHAKU_DIRNAME,
    NUNCHAKU_FP4_COMPUTE_CAPABILITIES,
    ModelChoice,
    ModelVariant,
)
from .tiny_model import (
    apply_torchvision_shim,
    ensure_tiny_lightning_lora,
    ensure_tiny_pipeline,
    is_tiny_folder,
)

log = structlog.get_logger()

# Transformer kinds.
NUNCHAKU_INT4 = "nunchaku-int4"
NUNCHAKU_FP4 = "nunchaku-fp4"
BF16 = "bf16"
FLOAT32_CPU = "float32-cpu"
# Offload modes.
OFFLOAD_NONE = "none"  # every component on the device
OFFLOAD_MODEL = "model-cpu-offload"  # one whole component on the GPU at a time
OFFLOAD_SEQUENTIAL = "sequential-cpu-offload"  # layer by layer (slowest, least VRAM)
OFFLOAD_NUNCHAKU_BLOCKS = "nunchaku-blocks+sequential"  # Nunchaku per-block + the rest sequential

TINY_CONDITION_AREA = 128 * 128  # tiny profile only: replaces the 1024*1024 target area
_FULL_CONDITION_AREA = 1024 * 1024
TINY_STEPS = 2  # default steps of the tiny base model (its outputs are noise anyway)
# Which scheduler runs (reported by `/v1/service`).
SCHEDULER_BASE = "the model's own (its repo's scheduler/ config)"
SCHEDULER_LIGHTNING = (
    "Lightning: FlowMatchEulerDiscrete, exponential time shift, base_shift = max_shift = "
    "ln 3, no shift_terminal (ModelTC/Qwen-Image-Lightning generate_with_diffusers.py)"
)


@dataclass
class LoadedPipeline:
    """A loaded pipeline and the choices made for it (reported by `/v1/service`)."""

    pipe: Any  # QwenImageEditPipeline | QwenImageEditPlusPipeline
    choice: ModelChoice
    transformer_kind: str
    offload: str
    device: str
    reason: str
    tiny: bool
    weights: list[str]  # the transformer's files, then the Lightning LoRA fused into it
    lightning: str | None = None  # how Lightning is loaded: a LoRA or a fused transformer

    @property
    def variant(self) -> ModelVariant:
        return self.choice.variant

    @property
    def scheduler(self) -> str:
        return SCHEDULER_BASE if self.choice.lightning_steps is None else SCHEDULER_LIGHTNING

    @property
    def default_steps(self) -> int:
        """The loaded weights' steps: Lightning's count, the model's (tiny base: 2)."""
        if self.tiny and self.choice.lightning_steps is None:
            return TINY_STEPS
        return self.choice.default_steps

    @property
    def default_true_cfg_scale(self) -> float:
        """4 for the base models, 1 with Lightning (manifest)."""
        return self.choice.default_true_cfg_scale

    def __call__(self, **kwargs: Any) -> list[Any]:
        """Run the pipeline; returns the PIL images."""
        scope = tiny_conditioning() if self.tiny else contextlib.nullcontext()
        with scope:
            return list(self.pipe(**kwargs).images)


def choose_offload(kind: str, free_gb: float) -> str:
    """Offload mode for a transformer kind given the free VRAM (decimal GB).

    bf16: transformer 40.9 GB + text encoder 16.6 GB (~58 GB peak, nunchaku #899).
    Nunchaku: 12.7 GB + 16.6 GB (~29 GB peak); its own per-block offload needs ~3-4 GB.
    """
    if kind == FLOAT32_CPU:
        return OFFLOAD_NONE
    if kind == BF16:
        if free_gb >= 62:
            return OFFLOAD_NONE
        return OFFLOAD_MODEL if free_gb >= 24 else OFFLOAD_SEQUENTIAL
    if kind in (NUNCHAKU_INT4, NUNCHAKU_FP4):
        if free_gb >= 36:
            return OFFLOAD_NONE
        return OFFLOAD_MODEL if free_gb > 18 else OFFLOAD_NUNCHAKU_BLOCKS
    raise ValueError(f"unknown transformer kind {kind!r}")


def resolve_offload(kind: str, free_gb: float, requested: str) -> str:
    """Offload mode for a kind: `choose_offload` for `auto`, else the operator's choice.

    `requested` is CPU_OFFLOAD: `auto`, `none`, `model` or `sequential` (for Nunchaku
    kinds `sequential` is its per-block offload). The CPU kind is never offloaded.
    """
    if kind == FLOAT32_CPU:
        return OFFLOAD_NONE
    if kind not in (BF16, NUNCHAKU_INT4, NUNCHAKU_FP4):
        raise ValueError(f"unknown transformer kind {kind!r}")
    if requested == "auto":
        return choose_offload(kind, free_gb)
    if requested == "none":
        return OFFLOAD_NONE
    if requested == "model":
        return OFFLOAD_MODEL
    if requested == "sequential":
        return OFFLOAD_SEQUENTIAL if kind == BF16 else OFFLOAD_NUNCHAKU_BLOCKS
    raise ValueError(f"unknown CPU_OFFLOAD {requested!r}; use auto, none, model or sequential")


def offload_reason(free_gb: float, requested: str, offload: str) -> str:
    """The reason's offload part: chosen from the free VRAM, or set by CPU_OFFLOAD."""
    if requested == "auto":
        return f"; {free_gb:.1f} GB VRAM free -> {offload}"
    return f"; CPU_OFFLOAD={requested} -> {offload} ({free_gb:.1f} GB VRAM free)"


def load_pipeline(config: WorkerConfig, choice: ModelChoice) -> LoadedPipeline:
    """Load `choice` as `config.profile` says; raises `SetupFailed` with what to do."""
    apply_torchvision_shim()
    if config.profile == "tiny":
        return _load_tiny(Path(config.models_dir), choice)
    if config.profile == "full":
        requested = str(config.options.get("cpu_offload", "auto"))
        return _load_full(Path(config.models_dir), choice, requested)
    raise SetupFailed(f"unknown profile {config.profile!r}; use `full` or `tiny`")


def use_lightning(pipe: Any, lora_file: Path | None) -> None:
    """Lightning's scheduler; and its LoRA fused into the transformer when given (the
    bf16 path: Nunchaku's Lightning transformers come with it fused already)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(LIGHTNING_SCHEDULER_CONFIG)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)  # type: ignore[no-untyped-call]
    if lora_file is not None:
        fuse_lora(pipe, lora_file)


def fuse_lora(pipe: Any, path: Path) -> None:
    """Load a LoRA with diffusers (lightx2v's layout is converted by its Qwen loader),
    fuse it into the transformer at scale 1, then drop the adapter layers: the fused
    weights stay and each step costs what the base model's does."""
    state_dict = pipe.lora_state_dict(str(path))
    _check_lora_fits(pipe.transformer, state_dict, path)
    pipe.load_lora_weights(state_dict, adapter_name="lightning")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()


def _check_lora_fits(transformer: Any, state_dict: dict[str, Any], path: Path) -> None:
    """Every LoRA pair names a layer of this transformer, of its shape: a LoRA for
    another model would otherwise load partly (diffusers only logs) or not at all."""
    problem = misfit(transformer, state_dict)
    if problem is not None:
        raise SetupFailed(
            f"the LoRA {path} does not fit this transformer: {problem}", path=str(path)
        )


# --- tiny -------------------------------------------------------------------------


def _load_tiny(models_dir: Path, choice: ModelChoice) -> LoadedPipeline:
    folder = ensure_tiny_pipeline(models_dir)
    pipe = _pipeline_class(choice.variant).from_pretrained(
        folder, use_safetensors=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)  # progress goes to the job instead
    reason = f"profile tiny: random-weight test pipeline at {folder}, float32 on CPU"
    weights, lightning = [str(folder / "transformer")], None
    if choice.lightning_steps is not None:
        lora = ensure_tiny_lightning_lora(models_dir, choice.lightning_steps, pipe.transformer)
        use_lightning(pipe, lora)
        weights.append(str(lora))
        lightning = f"{choice.lightning_steps}-step random-weight LoRA, fused"
    log.info("pipeline loaded", variant=choice.name, kind=FLOAT32_CPU, reason=reason)
    return LoadedPipeline(
        pipe, choice, FLOAT32_CPU, OFFLOAD_NONE, "cpu", reason,
        tiny=True, weights=weights, lightning=lightning,
    )  # fmt: skip


@contextlib.contextmanager
def tiny_conditioning() -> Iterator[None]:
    """Tiny profile only: shrink the pipelines' fixed ~1024² conditioning area to 128².

    Edit and Edit Plus resize every input image to ~1 MP for the VAE (Plus also to
    384² for the VL encoder) via their module's `calculate_dimensions`; on CPU that VAE
    encode dominates a tiny job (~3 s of ~3.4 s). Scaling the target area by 1/64
    makes a tiny job ~0.1 s. The default output size scales the same way (~128²).
    The full profile never enters this and runs diffusers unchanged.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    originals = [(module, module.calculate_dimensions) for module in (edit, plus)]
    try:
        for module, original in originals:
            module.calculate_dimensions = _scaled_dimensions(original)  # type: ignore[attr-defined]
        yield
    finally:
        for module, original in originals:
            module.calculate_dimensions = original  # type: ignore[attr-defined]


def _scaled_dimensions(original: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
    scale = TINY_CONDITION_AREA / _FULL_CONDITION_AREA

    def calculate_dimensions(target_area: float, ratio: float) -> tuple[Any, ...]:
        sizes = original(target_area * scale, ratio)
        # never 0 for an extreme aspect ratio (the originals round to multiples of 32)
        return tuple(max(32, v) if isinstance(v, int) else v for v in sizes)

    return calculate_dimensions


# --- full -------------------------------------------------------------------------


def _load_full(models_dir: Path, choice: ModelChoice, requested: str) -> LoadedPipeline:
    variant, steps = choice.variant, choice.lightning_steps
    folder = models_dir / variant.local_dirname
    _require(folder / "model_index.json", _base_hint(variant, folder))
    if is_tiny_folder(folder):
        raise SetupFailed(f"{folder} holds a tiny random-weight test model, not {variant.hf_repo}")
    if not torch.cuda.is_available():
        raise SetupFailed(
            "profile full needs a CUDA GPU and none is visible to torch; "
            "use PROFILE=tiny for a CPU demo"
        )
    kind, reason = _choose_transformer()
    if kind != BF16 and not variant.has_nunchaku(steps):
        kind, reason = _no_nunchaku_quantisation(choice, reason)
    nunchaku_file = lora_file = None
    if kind != BF16:
        nunchaku_file = _find_nunchaku_file(models_dir, variant, kind, steps)
        if nunchaku_file is None:
            kind, reason = _nunchaku_file_missing(models_dir, folder, choice, kind)
    if kind == BF16:
        _require(folder / "transformer" / "config.json", _base_hint(variant, folder))
        if choice.lightning_lora_file is not None:
            lora_file = models_dir / LIGHTNING_DIRNAME / choice.lightning_lora_file
            _require(lora_file, _lora_hint(choice, models_dir / LIGHTNING_DIRNAME))
    free_gb = torch.cuda.mem_get_info()[0] / 1e9
    offload = resolve_offload(kind, free_gb, requested)
    pipe = _from_pretrained_full(variant, folder, nunchaku_file)
    if steps is not None:
        use_lightning(pipe, lora_file)
    _apply_offload(pipe, offload)
    reason += offload_reason(free_gb, requested, offload)
    weights = [str(nunchaku_file or folder / "transformer")]
    weights += [str(lora_file)] if lora_file is not None else []
    log.info("pipeline loaded", variant=choice.name, kind=kind, offload=offload, reason=reason)
    return LoadedPipeline(
        pipe, choice, kind, offload, "cuda:0", reason,
        tiny=False, weights=weights, lightning=_lightning_how(choice, kind),
    )  # fmt: skip


def _lightning_how(choice: ModelChoice, kind: str) -> str | None:
    if choice.lightning_steps is None:
        return None
    if kind == BF16:
        return f"{choice.lightning_steps}-step LoRA {choice.lightning_lora_file}, fused"
    return f"{choice.lightning_steps}-step Nunchaku transformer (Lightning fused by Nunchaku)"


def _no_nunchaku_quantisation(choice: ModelChoice, nunchaku_reason: str) -> tuple[str, str]:
    """Nunchaku would run on this GPU, but publishes no file for this model."""
    what = "" if choice.lightning_steps is None else f" ({choice.lightning_steps}-step Lightning)"
    reason = (
        f"{nunchaku_reason} would run, but there is no official Nunchaku quantisation of "
        f"{choice.variant.hf_repo}{what}; using the bf16 transformer"
    )
    log.warning("nunchaku unavailable", reason=reason, variant=choice.name)
    return BF16, reason


def _choose_transformer() -> tuple[str, str]:
    """Nunchaku INT4/FP4 where it runs, else bf16; the reason is logged loudly."""
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    capability = f"{major}.{minor}"
    if (major, minor) not in NUNCHAKU_COMPUTE_CAPABILITIES:
        why = " (Hopper)" if major == 9 else " (B200)" if major == 10 else ""
        reason = (
            f"Nunchaku does not support compute capability {capability}{why} ({name}); "
            "using the bf16 transformer"
        )
        log.warning("nunchaku unavailable", reason=reason)
        return BF16, reason
    try:
        importlib.import_module("nunchaku")
    except Exception as exc:
        reason = (
            f"`import nunchaku` failed ({type(exc).__name__}: {exc}); using the bf16 "
            "transformer. Install the Nunchaku wheel matching this torch from its "
            "GitHub releases (the PyPI `nunchaku` is an unrelated project)"
        )
        log.warning("nunchaku unavailable", reason=reason)
        return BF16, reason
    kind = NUNCHAKU_FP4 if (major, minor) in NUNCHAKU_FP4_COMPUTE_CAPABILITIES else NUNCHAKU_INT4
    return kind, f"Nunchaku {_precision(kind)} on {name} (compute capability {capability})"


def _nunchaku_file_missing(
    models_dir: Path, folder: Path, choice: ModelChoice, kind: str
) -> tuple[str, str]:
    """Fall back to a local bf16 transformer, or fail naming the Nunchaku file."""
    name = choice.variant.nunchaku_filename(
        _precision(kind), lightning_steps=choice.lightning_steps
    )
    expected = models_dir / NUNCHAKU_DIRNAME / name
    if not (folder / "transformer").is_dir():
        _require(expected, _nunchaku_hint(choice, kind, models_dir / NUNCHAKU_DIRNAME))
    reason = f"Nunchaku file {expected} is missing; using the bf16 transformer"
    log.warning("nunchaku weights missing", reason=reason, variant=choice.name)
    return BF16, reason


def _precision(kind: str) -> str:
    return "fp4" if kind == NUNCHAKU_FP4 else "int4"


def _find_nunchaku_file(
    models_dir: Path, variant: ModelVariant, kind: str, lightning_steps: int | None = None
) -> Path | None:
    """The Nunchaku file for this precision: rank 128 preferred, then 32."""
    for rank in (NUNCHAKU_DEFAULT_RANK, 32):
        name = variant.nunchaku_filename(_precision(kind), rank, lightning_steps)
        path = models_dir / NUNCHAKU_DIRNAME / name
        if path.is_file():
            return path
    return None


def _from_pretrained_full(variant: ModelVariant, folder: Path, nunchaku_file: Path | None) -> Any:
    kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": torch.bfloat16}
    if nunchaku_file is not None:
        nunchaku = importlib.import_module("nunchaku")
        kwargs["transformer"] = nunchaku.NunchakuQwenImageTransformer2DModel.from_pretrained(
            str(nunchaku_file)
        )
    try:
        pipe = _pipeline_class(variant).from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise SetupFailed(
            f"could not load {variant.hf_repo} from {folder}: {exc}. " + _base_hint(variant, folder)
        ) from exc
    pipe.set_progress_bar_config(disable=True)  # progress goes to the job instead
    return pipe


def _apply_offload(pipe: Any, offload: str) -> None:
    if offload == OFFLOAD_NONE:
        pipe.to("cuda")
    elif offload == OFFLOAD_MODEL:
        pipe.enable_model_cpu_offload()
    elif offload == OFFLOAD_SEQUENTIAL:
        pipe.enable_sequential_cpu_offload()
    elif offload == OFFLOAD_NUNCHAKU_BLOCKS:
        pipe.transformer.set_offload(True, use_pin_memory=False, num_blocks_on_gpu=1)
        # an instance copy: the attribute is a list shared by every pipeline class
        pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, "transformer"]
        pipe.enable_sequential_cpu_offload()
    else:
        raise ValueError(f"unknown offload mode {offload!r}")


# --- shared -----------------------------------------------------------------------


def _pipeline_class(variant: ModelVariant) -> Any:
    import diffusers

    return getattr(diffusers, variant.pipeline_class)


def _require(path: Path, hint: str) -> None:
    if not path.exists():
        raise SetupFailed(f"model file missing: {path}. {hint}", path=str(path))


def _base_hint(variant: ModelVariant, folder: Path) -> str:
    return (
        f"Download the diffusers pipeline {variant.hf_repo} into {folder} (for example "
        f"`hf download {variant.hf_repo} --local-dir {folder}`; add `--exclude "
        f"'transformer/*'` when using a Nunchaku transformer), or run with PROFILE=tiny."
    )


def _nunchaku_hint(choice: ModelChoice, kind: str, nunchaku_dir: Path) -> str:
    variant, precision = choice.variant, _precision(kind)
    name = variant.nunchaku_filename(precision, NUNCHAKU_DEFAULT_RANK, choice.lightning_steps)
    gb = math.ceil(variant.nunchaku_file_gb)
    return (
        f"Download the Nunchaku {precision} transformer (~{gb} GB): `hf download "
        f"{variant.nunchaku_repo} {name} --local-dir {nunchaku_dir}`, or the bf16 "
        f"`transformer/` of {variant.hf_repo}."
    )


def _lora_hint(choice: ModelChoice, lightning_dir: Path) -> str:
    variant, name = choice.variant, choice.lightning_lora_file
    return (
        f"Download the {choice.lightning_steps}-step Lightning LoRA "
        f"(~{variant.lightning_lora_gb} GB): `hf download {variant.lightning_lora_repo} "
        f"{name} --local-dir {lightning_dir}`, or run {variant.name} without Lightning."
    )
