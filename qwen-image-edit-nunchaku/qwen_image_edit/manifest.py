"""What each model variant needs: Hub ids, files, sizes, defaults. No torch here.

MODEL_VARIANT names a variant (`edit`, `edit-2509`, `edit-2511`), alone or with its
Lightning (step-distilled) weights: `edit-2509-lightning-4`, `edit-2511-lightning-8`, ...
Sizes are decimal GB as Hugging Face shows them (shared/reference/model-stacks.md §4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Compute capabilities Nunchaku's kernels are built for (its setup.py: sm_75/80/86/89/
# 120a/121a). Hopper (9.0: H100/H200) and B200 (10.0) are not supported.
NUNCHAKU_COMPUTE_CAPABILITIES: frozenset[tuple[int, int]] = frozenset(
    {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}
)
# FP4 (NVFP4) kernels are Blackwell consumer/workstation only; INT4 everywhere else.
NUNCHAKU_FP4_COMPUTE_CAPABILITIES: frozenset[tuple[int, int]] = frozenset({(12, 0), (12, 1)})
NUNCHAKU_DEFAULT_RANK = 128  # better quality than 32 for ~1.2 GB more
NUNCHAKU_DIRNAME = "nunchaku"  # MODELS_DIR/nunchaku/<file as named in its Hub repo>
LIGHTNING_DIRNAME = "lightning"  # MODELS_DIR/lightning/<LoRA file as named in its Hub repo>

# The base models' guidance: true CFG 4 with the negative prompt " " for Edit, 2509 and
# 2511 (QwenLM/Qwen-Image README quick starts; nunchaku examples/v1/qwen-image-edit*.py).
BASE_TRUE_CFG_SCALE = 4.0

# Lightning: the steps it was distilled for, at true_cfg_scale 1 (one pass per step):
# ModelTC/Qwen-Image-Lightning README ("# 8 steps, cfg 1.0", "# 4 steps, cfg 1.0").
LIGHTNING_STEPS = (4, 8)
LIGHTNING_TRUE_CFG_SCALE = 1.0
# The scheduler Lightning was distilled with, not the base repos' `scheduler/` config:
# ModelTC/Qwen-Image-Lightning generate_with_diffusers.py (lines 82-97 at 342260e, copied
# as is by nunchaku examples/v1/qwen-image-edit-lightning.py and
# qwen-image-edit-2509-lightning.py): "We use shift=3 in distillation", i.e. base_shift =
# max_shift = ln 3 with the exponential time shift, and no shift_terminal (the base repos
# use base_shift 0.5, max_shift 0.9, shift_terminal 0.02). lightx2v publishes no other
# config for its 2511 Lightning LoRA; the same one is used for it.
LIGHTNING_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "base_image_seq_len": 256,
        "base_shift": math.log(3),
        "invert_sigmas": False,
        "max_image_seq_len": 8192,
        "max_shift": math.log(3),
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "shift_terminal": None,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_dynamic_shifting": True,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    }
)
_LIGHTNING_SUFFIX = "-lightning-"


@dataclass(frozen=True)
class ModelVariant:
    """One Qwen-Image-Edit model: where its weights live and how to run it."""

    name: str
    hf_repo: str  # the diffusers pipeline repo (transformer/, text_encoder/, vae/, ...)
    pipeline_class: str  # diffusers class name
    local_dirname: str  # folder under MODELS_DIR holding a copy of `hf_repo`
    default_steps: int
    max_input_images: int
    # Nunchaku's 4-bit transformers (format with precision "int4"/"fp4" and rank);
    # None: there is no official Nunchaku quantisation of this model.
    nunchaku_repo: str | None
    nunchaku_file_template: str | None
    # Lightning: Nunchaku's transformers with the Lightning LoRA fused in (steps -> file
    # in `nunchaku_repo`), and lightx2v's bf16 LoRA for the bf16 path (steps -> file in
    # `lightning_lora_repo`).
    nunchaku_lightning_templates: Mapping[int, str]
    lightning_lora_repo: str
    lightning_lora_files: Mapping[int, str]
    default_true_cfg_scale: float = BASE_TRUE_CFG_SCALE
    transformer_bf16_gb: float = 40.9
    text_encoder_gb: float = 16.6  # Qwen2.5-VL-7B
    vae_gb: float = 0.25
    nunchaku_file_gb: float = 12.7  # int4 r128 (fp4 r128: 13.1)
    lightning_lora_gb: float = 0.85  # bf16 (model-stacks.md §4.1)
    # Smallest VRAM that runs at all: Nunchaku with per-block offload needs ~3-4 GB;
    # bf16 with sequential offload streams layers and needs a few GB for activations.
    min_vram_gb_nunchaku: float = 4.0
    min_vram_gb_bf16: float = 8.0

    def has_nunchaku(self, lightning_steps: int | None = None) -> bool:
        """Whether Nunchaku publishes a transformer for this model (and Lightning choice)."""
        if lightning_steps is None:
            return self.nunchaku_file_template is not None
        return lightning_steps in self.nunchaku_lightning_templates

    def nunchaku_filename(
        self, precision: str, rank: int = NUNCHAKU_DEFAULT_RANK, lightning_steps: int | None = None
    ) -> str:
        """The file's path in `nunchaku_repo`; with Lightning, the fused Lightning file."""
        if lightning_steps is None:
            template = self.nunchaku_file_template
        else:
            template = self.nunchaku_lightning_templates.get(lightning_steps)
        if template is None:
            raise ValueError(f"no Nunchaku transformer for {self.name} ({lightning_steps=})")
        return template.format(precision=precision, rank=rank)

    def nunchaku_hf_path(
        self, precision: str, rank: int = NUNCHAKU_DEFAULT_RANK, lightning_steps: int | None = None
    ) -> str:
        """`repo/file` as Nunchaku's `from_pretrained` accepts it."""
        return f"{self.nunchaku_repo}/{self.nunchaku_filename(precision, rank, lightning_steps)}"

    @property
    def download_gb_nunchaku(self) -> float:
        """The base repo without `transformer/`, plus one Nunchaku file."""
        return round(self.text_encoder_gb + self.vae_gb + self.nunchaku_file_gb, 1)

    @property
    def download_gb_bf16(self) -> float:
        return round(self.transformer_bf16_gb + self.text_encoder_gb + self.vae_gb, 1)


EDIT = ModelVariant(
    name="edit",
    hf_repo="Qwen/Qwen-Image-Edit",
    pipeline_class="QwenImageEditPipeline",
    local_dirname="Qwen-Image-Edit",
    default_steps=50,  # QwenLM/Qwen-Image README (Qwen-Image-Edit quick start)
    max_input_images=1,
    nunchaku_repo="nunchaku-tech/nunchaku-qwen-image-edit",
    nunchaku_file_template="svdq-{precision}_r{rank}-qwen-image-edit.safetensors",
    # nunchaku examples/v1/qwen-image-edit-lightning.py
    nunchaku_lightning_templates=MappingProxyType(
        {
            steps: f"svdq-{{precision}}_r{{rank}}-qwen-image-edit-lightningv1.0-{steps}steps"
            ".safetensors"
            for steps in LIGHTNING_STEPS
        }
    ),
    # ModelTC/Qwen-Image-Lightning README (news 2025-08-23/24: the bf16 versions)
    lightning_lora_repo="lightx2v/Qwen-Image-Lightning",
    lightning_lora_files=MappingProxyType(
        {
            steps: f"Qwen-Image-Edit-Lightning-{steps}steps-V1.0-bf16.safetensors"
            for steps in LIGHTNING_STEPS
        }
    ),
)
EDIT_2509 = ModelVariant(
    name="edit-2509",
    hf_repo="Qwen/Qwen-Image-Edit-2509",
    pipeline_class="QwenImageEditPlusPipeline",
    local_dirname="Qwen-Image-Edit-2509",
    default_steps=40,  # Nunchaku's example and the QwenLM README; the diffusers default is 50
    max_input_images=3,
    nunchaku_repo="nunchaku-tech/nunchaku-qwen-image-edit-2509",
    nunchaku_file_template="svdq-{precision}_r{rank}-qwen-image-edit-2509.safetensors",
    # nunchaku examples/v1/qwen-image-edit-2509-lightning.py at 3a3cc3d (since b0544d9,
    # 2025-11-16): the `lightning-251115/` files, which replace the older lightningv2.0 ones
    nunchaku_lightning_templates=MappingProxyType(
        {
            steps: f"lightning-251115/svdq-{{precision}}_r{{rank}}-qwen-image-edit-2509-"
            f"lightning-{steps}steps-251115.safetensors"
            for steps in LIGHTNING_STEPS
        }
    ),
    # ModelTC/Qwen-Image-Lightning README (news 2025-10-06/09: 2509 V1.0 and bf16 versions)
    lightning_lora_repo="lightx2v/Qwen-Image-Lightning",
    lightning_lora_files=MappingProxyType(
        {
            steps: f"Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-{steps}steps-V1.0-bf16"
            ".safetensors"
            for steps in LIGHTNING_STEPS
        }
    ),
)
EDIT_2511 = ModelVariant(
    name="edit-2511",
    hf_repo="Qwen/Qwen-Image-Edit-2511",  # released 2025-12-23 (QwenLM/Qwen-Image README)
    pipeline_class="QwenImageEditPlusPipeline",  # the README's quick start: same class as 2509
    local_dirname="Qwen-Image-Edit-2511",
    default_steps=40,  # QwenLM/Qwen-Image README quick start: 40 steps, true_cfg_scale 4.0
    max_input_images=3,
    # No official Nunchaku quantisation of 2511 (nunchaku-tech publishes Edit and 2509
    # only; workflow-fidelity.md §8): on a Nunchaku GPU it runs the bf16 transformer.
    nunchaku_repo=None,
    nunchaku_file_template=None,
    nunchaku_lightning_templates=MappingProxyType({}),
    # lightx2v's own repo for 2511 (released 2025-12-22): the 4-step V1.0 LoRA; the 8-step
    # file came later and is confirmed only by third-party downloaders, not first hand.
    lightning_lora_repo="lightx2v/Qwen-Image-Edit-2511-Lightning",
    lightning_lora_files=MappingProxyType(
        {
            steps: f"Qwen-Image-Edit-2511-Lightning-{steps}steps-V1.0-bf16.safetensors"
            for steps in LIGHTNING_STEPS
        }
    ),
)

VARIANTS: Mapping[str, ModelVariant] = MappingProxyType(
    {v.name: v for v in (EDIT, EDIT_2509, EDIT_2511)}
)
# 2509 stays the default: Nunchaku publishes its 4-bit files (≈30 GB to download, runs in
# 4-29 GB of VRAM) while 2511 has only bf16 (≈58 GB, needs offload below 62 GB free).
DEFAULT_VARIANT = EDIT_2509.name


@dataclass(frozen=True)
class ModelChoice:
    """What MODEL_VARIANT names: a variant, alone or with its Lightning weights."""

    variant: ModelVariant
    lightning_steps: int | None = None  # None: the base weights

    @property
    def name(self) -> str:
        if self.lightning_steps is None:
            return self.variant.name
        return f"{self.variant.name}{_LIGHTNING_SUFFIX}{self.lightning_steps}"

    @property
    def default_steps(self) -> int:
        """Steps of the loaded weights: Lightning's own count, else the model's."""
        return self.lightning_steps or self.variant.default_steps

    @property
    def default_true_cfg_scale(self) -> float:
        if self.lightning_steps is None:
            return self.variant.default_true_cfg_scale
        return LIGHTNING_TRUE_CFG_SCALE

    @property
    def lightning_lora_file(self) -> str | None:
        """The LoRA's path in its Hub repo (the bf16 path), or None without Lightning."""
        if self.lightning_steps is None:
            return None
        return self.variant.lightning_lora_files[self.lightning_steps]


def parse_model_variant(name: str | None) -> ModelChoice:
    """MODEL_VARIANT (None: the default) as a choice; ValueError names the choices."""
    key = name or DEFAULT_VARIANT
    base, lightning, steps = key.partition(_LIGHTNING_SUFFIX)
    variant = VARIANTS.get(base)
    if variant is not None and not lightning:
        return ModelChoice(variant)
    if variant is not None and steps in {str(s) for s in LIGHTNING_STEPS}:
        return ModelChoice(variant, int(steps))
    raise ValueError(
        f"unknown model variant {key!r}; choose one of {', '.join(VARIANTS)}, each alone or "
        f"with {_LIGHTNING_SUFFIX}4 or {_LIGHTNING_SUFFIX}8 (Lightning), e.g. "
        f"{DEFAULT_VARIANT}{_LIGHTNING_SUFFIX}8"
    )


def get_variant(name: str | None) -> ModelVariant:
    """The model MODEL_VARIANT `name` loads (default when None), Lightning or not."""
    return parse_model_variant(name).variant
