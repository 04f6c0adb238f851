"""What each model variant needs: Hub ids, files, sizes, defaults. No torch here.

Sizes are decimal GB as Hugging Face shows them (shared/reference/model-stacks.md §4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# Compute capabilities Nunchaku's kernels are built for (its setup.py: sm_75/80/86/89/
# 120a/121a). Hopper (9.0: H100/H200) and B200 (10.0) are not supported.
NUNCHAKU_COMPUTE_CAPABILITIES: frozenset[tuple[int, int]] = frozenset(
    {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}
)
# FP4 (NVFP4) kernels are Blackwell consumer/workstation only; INT4 everywhere else.
NUNCHAKU_FP4_COMPUTE_CAPABILITIES: frozenset[tuple[int, int]] = frozenset({(12, 0), (12, 1)})
NUNCHAKU_DEFAULT_RANK = 128  # better quality than 32 for ~1.2 GB more


@dataclass(frozen=True)
class ModelVariant:
    """One Qwen-Image-Edit model: where its weights live and how to run it."""

    name: str
    hf_repo: str  # the diffusers pipeline repo (transformer/, text_encoder/, vae/, ...)
    pipeline_class: str  # diffusers class name
    local_dirname: str  # folder under MODELS_DIR holding a copy of `hf_repo`
    nunchaku_repo: str
    nunchaku_file_template: str  # format with precision ("int4"/"fp4") and rank
    default_steps: int
    max_input_images: int
    transformer_bf16_gb: float = 40.9
    text_encoder_gb: float = 16.6  # Qwen2.5-VL-7B
    vae_gb: float = 0.25
    nunchaku_file_gb: float = 12.7  # int4 r128 (fp4 r128: 13.1)
    # Smallest VRAM that runs at all: Nunchaku with per-block offload needs ~3-4 GB;
    # bf16 with sequential offload streams layers and needs a few GB for activations.
    min_vram_gb_nunchaku: float = 4.0
    min_vram_gb_bf16: float = 8.0

    def nunchaku_filename(self, precision: str, rank: int = NUNCHAKU_DEFAULT_RANK) -> str:
        return self.nunchaku_file_template.format(precision=precision, rank=rank)

    def nunchaku_hf_path(self, precision: str, rank: int = NUNCHAKU_DEFAULT_RANK) -> str:
        """`repo/file` as Nunchaku's `from_pretrained` accepts it."""
        return f"{self.nunchaku_repo}/{self.nunchaku_filename(precision, rank)}"

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
    nunchaku_repo="nunchaku-tech/nunchaku-qwen-image-edit",
    nunchaku_file_template="svdq-{precision}_r{rank}-qwen-image-edit.safetensors",
    default_steps=50,
    max_input_images=1,
)
EDIT_2509 = ModelVariant(
    name="edit-2509",
    hf_repo="Qwen/Qwen-Image-Edit-2509",
    pipeline_class="QwenImageEditPlusPipeline",
    local_dirname="Qwen-Image-Edit-2509",
    nunchaku_repo="nunchaku-tech/nunchaku-qwen-image-edit-2509",
    nunchaku_file_template="svdq-{precision}_r{rank}-qwen-image-edit-2509.safetensors",
    default_steps=40,  # Nunchaku's example; the diffusers default is 50
    max_input_images=3,
)

VARIANTS: Mapping[str, ModelVariant] = MappingProxyType({v.name: v for v in (EDIT, EDIT_2509)})
DEFAULT_VARIANT = EDIT_2509.name
NUNCHAKU_DIRNAME = "nunchaku"  # MODELS_DIR/nunchaku/<nunchaku file>


def get_variant(name: str | None) -> ModelVariant:
    """The variant called `name` (default when None); ValueError names the choices."""
    key = name or DEFAULT_VARIANT
    try:
        return VARIANTS[key]
    except KeyError:
        raise ValueError(
            f"unknown model variant {key!r}; choose one of {', '.join(VARIANTS)}"
        ) from None
