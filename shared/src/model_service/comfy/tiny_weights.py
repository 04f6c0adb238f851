"""Tiny random-weight Wan-family model files that ComfyUI 0.33's real loaders accept.

They let our ComfyUI services run their real workflows on a CPU in about a second: every
loader node picks the architecture from the file's keys and shapes, so a file with the
right key names, tiny sizes and a few safetensors metadata entries goes through detection,
loading, sampling and decoding like a real one. The configs and tricks come from
measurements against a real ComfyUI 0.33.0 (shared/reference/tiny-wan-notes.md).

Kinds (`TINY_KINDS`; sizes on disk):

- `wan22_ti2v_dit` (1.0 MB): Wan2.2 TI2V-5B-family DiT: in 48, out 48, dim 128, ffn 256,
  1 block; `text_dim` 768 through the metadata `config` (ComfyUI: `WAN22_T2V`).
- `wan_a14b_dit` (1.4 MB): one Wan2.2 A14B image-to-video expert: in 36, out 16, no
  `img_emb`, dim 160, ffn 320, 1 block, text_dim 768 (ComfyUI: `WAN21_T2V`, which
  concatenates the image latent, as for the real A14B).
- `wan_a14b_t2v_dit` (1.4 MB): one A14B text-to-video expert: in 16, out 16, dim 160.
- `wan21_i2v_dit` (5.2 MB): Wan2.1 I2V 14B (the InfiniteTalk base): like `wan_a14b_dit`
  plus `img_emb` (ComfyUI: `WAN21_I2V`).
- `wan_lora` (30 KB): rank-4 LoRA (`diffusion_model.blocks.0.*.lora_{down,up}.weight`,
  `.alpha`) on the 10 block matrices of a 1-block DiT of dim 160, i.e. for the three
  dim-160 DiTs above. `wan_lora_128` (24 KB) is the same for `wan22_ti2v_dit`.
- `umt5_xxl` (110 MB): NOT a UMT5: ComfyUI builds UMT5-XXL at its fixed full size (about
  60 s an encode on a CPU), so this is a T5-base-shaped encoder (fixed by ComfyUI: 768-d,
  12 blocks, vocab 32128) in fp8 e4m3fn, without `spiece_model`, which `CLIPLoader` (type
  `wan` included) loads as `SAT5Model` with 768-d output; hence the DiTs' text_dim 768.
- `wan22_vae` (23 MB): TAEHV with 48 latent channels, which ComfyUI uses in the Wan2.2 VAE
  format (16x spatial, 4x temporal); the real Wan2.2 VAE is fixed at 705 M parameters.
  Its last conv is scaled x100 with bias 0.5: a random ReLU stack shrinks activations so
  much that the frames would otherwise be black.
- `wan21_vae` (0.5 MB): the real Wan2.1 VAE class with dim 4 (ComfyUI reads the dim from
  `decoder.head.0.gamma`).
- `wav2vec2_base` (95 MB): wav2vec2-base (fixed by ComfyUI: 768-d, 12 layers), fp8.
- `infinitetalk_patch` (8.5 MB): InfiniteTalk `MultiTalkModelPatch` for `ModelPatchLoader`:
  in_dim 160 (the DiT dim), intermediate 16, out 16; its 40 blocks are fixed by ComfyUI.
- `clip_vision_h` (1.3 GB, sparse: about 4 MB on disk): CLIP ViT-H/14, fixed by ComfyUI at
  full size (it picks the config from the key `...layers.30...`, and the Wan I2V `img_emb`
  takes 1280-d features): random embeddings and norms, but all-zero matrices in the 32
  blocks (each block is then the identity), which are written as holes in the file.

Every file carries the metadata `model_service_tiny` = "1" (see `is_tiny`), so that nothing
mistakes it for real weights, plus its kind, a format version and its seed.

Import cost: torch is imported only when a file is generated (the files are written
here, in the safetensors format, so that a seed gives the same bytes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["TINY_KINDS", "TINY_TAG", "is_tiny", "materialize", "write_tiny"]

TINY_TAG = "model_service_tiny"
"""Safetensors metadata key (value "1") that marks a file written by this module."""

_KIND_KEY = "model_service_tiny_kind"
_VERSION_KEY = "model_service_tiny_version"
_SEED_KEY = "model_service_tiny_seed"
_VERSION = "2"  # bump when the contents of a kind change: cached and placed files are redone
_STD = 0.02
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class _Weights:
    """A state dict being filled, in generation order, with seeded tensors of one dtype."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.tensors: dict[str, torch.Tensor] = {}

    def normal(self, name: str, shape: tuple[int, ...], std: float = _STD) -> None:
        import torch

        values = torch.randn(shape, generator=self.generator) * std
        self.tensors[name] = values.to(self.dtype)

    def const(self, name: str, shape: tuple[int, ...], value: float) -> None:
        """Zeros take no memory (one broadcast element) and no disk (`_save` skips them)."""
        import torch

        if value == 0.0:
            self.tensors[name] = torch.zeros((), dtype=self.dtype).expand(shape)
        else:
            self.tensors[name] = torch.full(shape, value).to(self.dtype)

    def linear(self, prefix: str, n_in: int, n_out: int, *, bias: bool = True) -> None:
        self.normal(f"{prefix}.weight", (n_out, n_in))
        if bias:
            self.normal(f"{prefix}.bias", (n_out,))

    def conv(
        self,
        prefix: str,
        n_in: int,
        n_out: int,
        kernel: tuple[int, ...],
        *,
        bias: bool = True,
        keep_scale: bool = False,
    ) -> None:
        """`keep_scale`: He-initialised with zero bias, so activations keep their size
        through a deep ReLU stack and the output still depends on the input."""
        if keep_scale:
            fan_in = n_in * math.prod(kernel)
            self.normal(f"{prefix}.weight", (n_out, n_in, *kernel), std=math.sqrt(2 / fan_in))
            if bias:
                self.const(f"{prefix}.bias", (n_out,), 0.0)
            return
        self.normal(f"{prefix}.weight", (n_out, n_in, *kernel))
        if bias:
            self.normal(f"{prefix}.bias", (n_out,))

    def norm(self, prefix: str, dim: int, *, bias: bool = True) -> None:
        """A LayerNorm/RMSNorm/GroupNorm: weight 1, bias 0."""
        self.const(f"{prefix}.weight", (dim,), 1.0)
        if bias:
            self.const(f"{prefix}.bias", (dim,), 0.0)


# --- Wan DiT (comfy/ldm/wan/model.py: WanModel) and its LoRA ---

_FREQ_DIM = 256
_TEXT_DIM = 768  # the T5-base stand-in's output; ComfyUI's default is 4096 (UMT5-XXL)
_CLIP_VISION_DIM = 1280


def _wan_dit(w: _Weights, *, in_dim: int, out_dim: int, dim: int, i2v: bool = False) -> None:
    ffn_dim = 2 * dim
    w.conv("patch_embedding", in_dim, dim, (1, 2, 2))
    w.linear("text_embedding.0", _TEXT_DIM, dim)
    w.linear("text_embedding.2", dim, dim)
    w.linear("time_embedding.0", _FREQ_DIM, dim)
    w.linear("time_embedding.2", dim, dim)
    w.linear("time_projection.1", dim, 6 * dim)
    p = "blocks.0"  # one block: ComfyUI counts the `blocks.N.` prefixes
    w.normal(f"{p}.modulation", (1, 6, dim))
    for attn in ("self_attn", "cross_attn"):
        for m in "qkvo":
            w.linear(f"{p}.{attn}.{m}", dim, dim)
        w.norm(f"{p}.{attn}.norm_q", dim, bias=False)
        w.norm(f"{p}.{attn}.norm_k", dim, bias=False)
    w.norm(f"{p}.norm3", dim)
    if i2v:
        w.linear(f"{p}.cross_attn.k_img", dim, dim)
        w.linear(f"{p}.cross_attn.v_img", dim, dim)
        w.norm(f"{p}.cross_attn.norm_k_img", dim, bias=False)
    w.linear(f"{p}.ffn.0", dim, ffn_dim)
    w.linear(f"{p}.ffn.2", ffn_dim, dim)
    w.normal("head.modulation", (1, 2, dim))
    w.linear("head.head", dim, out_dim * 4)  # patch (1, 2, 2)
    if i2v:  # `img_emb.proj.0.bias` is what makes ComfyUI choose i2v
        w.norm("img_emb.proj.0", _CLIP_VISION_DIM)
        w.linear("img_emb.proj.1", _CLIP_VISION_DIM, _CLIP_VISION_DIM)
        w.linear("img_emb.proj.3", _CLIP_VISION_DIM, dim)
        w.norm("img_emb.proj.4", dim)


def _dit_config(dim: int) -> str:
    # Merged into the detected config by ComfyUI 0.33 (model_detection, `config` metadata);
    # text_dim is not detected from the weights, num_heads would be dim // 128.
    return json.dumps({"transformer": {"text_dim": _TEXT_DIM, "num_heads": max(1, dim // 128)}})


_LORA_RANK = 4


def _wan_lora(w: _Weights, *, dim: int) -> None:
    ffn_dim = 2 * dim
    targets = [f"{a}.{m}" for a in ("self_attn", "cross_attn") for m in "qkvo"]
    shapes = {t: (dim, dim) for t in targets} | {"ffn.0": (dim, ffn_dim), "ffn.2": (ffn_dim, dim)}
    for target, (n_in, n_out) in shapes.items():
        prefix = f"diffusion_model.blocks.0.{target}"
        w.normal(f"{prefix}.lora_down.weight", (_LORA_RANK, n_in))
        w.normal(f"{prefix}.lora_up.weight", (n_out, _LORA_RANK))
        w.const(f"{prefix}.alpha", (), float(_LORA_RANK))


# --- text encoder stand-in (comfy/text_encoders/t5.py: T5 with t5_config_base.json) ---


def _t5_base(w: _Weights) -> None:
    d_model, d_ff, heads, layers, vocab, buckets = 768, 3072, 12, 12, 32128, 32
    for i in range(layers):
        p = f"encoder.block.{i}.layer"
        for m in "qkvo":
            w.linear(f"{p}.0.SelfAttention.{m}", d_model, d_model, bias=False)
        if i == 0:
            w.normal(f"{p}.0.SelfAttention.relative_attention_bias.weight", (buckets, heads))
        w.norm(f"{p}.0.layer_norm", d_model, bias=False)
        w.linear(f"{p}.1.DenseReluDense.wi", d_model, d_ff, bias=False)
        w.linear(f"{p}.1.DenseReluDense.wo", d_ff, d_model, bias=False)
        w.norm(f"{p}.1.layer_norm", d_model, bias=False)
    w.norm("encoder.final_layer_norm", d_model, bias=False)
    w.normal("shared.weight", (vocab, d_model))


# --- VAEs ---


def _taehv48(w: _Weights) -> None:
    """comfy/taesd/taehv.py: TAEHV(latent_channels=48) (patch size 2)."""
    latent, image = 48, 3 * 2 * 2

    def memblock(prefix: str, n: int, keep_scale: bool = False) -> None:
        w.conv(f"{prefix}.conv.0", 2 * n, n, (3, 3), keep_scale=keep_scale)
        w.conv(f"{prefix}.conv.2", n, n, (3, 3), keep_scale=keep_scale)
        w.conv(f"{prefix}.conv.4", n, n, (3, 3), keep_scale=keep_scale)

    # The encoder keeps the signal's scale: the latent of an image (image-to-video's start
    # frame) must depend on the image, or every start image gives the same video.
    w.conv("encoder.0", image, 64, (3, 3), keep_scale=True)
    index = 2
    for t_stride in (2, 2, 1):  # TPool, strided conv, 3 MemBlocks
        w.conv(f"encoder.{index}.conv", 64 * t_stride, 64, (1, 1), bias=False, keep_scale=True)
        w.conv(f"encoder.{index + 1}", 64, 64, (3, 3), bias=False, keep_scale=True)
        for j in range(3):
            memblock(f"encoder.{index + 2 + j}", 64, keep_scale=True)
        index += 5
    w.conv(f"encoder.{index}", 64, latent, (3, 3), keep_scale=True)

    n_f = (256, 128, 64, 64)
    w.conv("decoder.1", latent, n_f[0], (3, 3))
    index = 3
    for stage, t_stride in enumerate((1, 2, 2)):  # 3 MemBlocks, upsample, TGrow, conv
        n = n_f[stage]
        for j in range(3):
            memblock(f"decoder.{index + j}", n)
        w.conv(f"decoder.{index + 4}.conv", n, n * t_stride, (1, 1), bias=False)
        w.conv(f"decoder.{index + 5}", n, n_f[stage + 1], (3, 3), bias=False)
        index += 6
    # The last conv (decoder.22, which ComfyUI's detection keys on): x100, bias 0.5.
    w.normal(f"decoder.{index + 1}.weight", (image, n_f[3], 3, 3), std=_STD * 100)
    w.const(f"decoder.{index + 1}.bias", (image,), 0.5)


def _wan21_vae(w: _Weights, *, dim: int = 4, z_dim: int = 16) -> None:
    """comfy/ldm/wan/vae.py: WanVAE as ComfyUI configures it, with a tiny `dim`."""
    dim_mult = (1, 2, 4, 4)

    def gamma(name: str, n: int, *, images: bool = False) -> None:
        w.const(f"{name}.gamma", (n, 1, 1) if images else (n, 1, 1, 1), 1.0)

    def residual(prefix: str, n_in: int, n_out: int) -> None:
        gamma(f"{prefix}.residual.0", n_in)
        w.conv(f"{prefix}.residual.2", n_in, n_out, (3, 3, 3))
        gamma(f"{prefix}.residual.3", n_out)
        w.conv(f"{prefix}.residual.6", n_out, n_out, (3, 3, 3))
        if n_in != n_out:
            w.conv(f"{prefix}.shortcut", n_in, n_out, (1, 1, 1))

    def middle(prefix: str, n: int) -> None:
        residual(f"{prefix}.middle.0", n, n)
        gamma(f"{prefix}.middle.1.norm", n, images=True)
        w.conv(f"{prefix}.middle.1.to_qkv", n, 3 * n, (1, 1))
        w.conv(f"{prefix}.middle.1.proj", n, n, (1, 1))
        residual(f"{prefix}.middle.2", n, n)

    # encoder (temporal downsampling False, True, True)
    dims = [dim * u for u in (1, *dim_mult)]
    w.conv("encoder.conv1", 3, dims[0], (3, 3, 3))
    index = 0
    for i, (n_in, n_out) in enumerate(pairwise(dims)):
        for _ in range(2):
            residual(f"encoder.downsamples.{index}", n_in, n_out)
            n_in = n_out
            index += 1
        if i != len(dim_mult) - 1:
            w.conv(f"encoder.downsamples.{index}.resample.1", n_out, n_out, (3, 3))
            if i > 0:
                w.conv(f"encoder.downsamples.{index}.time_conv", n_out, n_out, (3, 1, 1))
            index += 1
    middle("encoder", dims[-1])
    gamma("encoder.head.0", dims[-1])
    w.conv("encoder.head.2", dims[-1], 2 * z_dim, (3, 3, 3))
    w.conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    w.conv("conv2", z_dim, z_dim, (1, 1, 1))

    # decoder (temporal upsampling True, True, False)
    dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
    w.conv("decoder.conv1", z_dim, dims[0], (3, 3, 3))
    middle("decoder", dims[0])
    index = 0
    for i, (n_in, n_out) in enumerate(pairwise(dims)):
        if i > 0:
            n_in //= 2
        for _ in range(3):
            residual(f"decoder.upsamples.{index}", n_in, n_out)
            n_in = n_out
            index += 1
        if i != len(dim_mult) - 1:
            w.conv(f"decoder.upsamples.{index}.resample.1", n_out, n_out // 2, (3, 3))
            if i < 2:
                w.conv(f"decoder.upsamples.{index}.time_conv", n_out, 2 * n_out, (3, 1, 1))
            index += 1
    gamma("decoder.head.0", dims[-1])
    w.conv("decoder.head.2", dims[-1], 3, (3, 3, 3))


# --- audio (comfy/audio_encoders/wav2vec2.py, comfy_extras/nodes_model_patch.py) ---

_W2V_DIM, _W2V_LAYERS = 768, 12


def _wav2vec2_base(w: _Weights) -> None:
    conv_dim, dim = 512, _W2V_DIM
    w.normal("masked_spec_embed", (dim,))
    w.conv("feature_extractor.conv_layers.0.conv", 1, conv_dim, (10,), bias=False)
    w.norm("feature_extractor.conv_layers.0.layer_norm", conv_dim)
    for i, kernel in enumerate((3, 3, 3, 3, 2, 2), start=1):
        w.conv(f"feature_extractor.conv_layers.{i}.conv", conv_dim, conv_dim, (kernel,), bias=False)
    w.norm("feature_projection.layer_norm", conv_dim)
    w.linear("feature_projection.projection", conv_dim, dim)
    w.normal("encoder.pos_conv_embed.conv.bias", (dim,))
    w.const("encoder.pos_conv_embed.conv.parametrizations.weight.original0", (1, 1, 128), 1.0)
    w.normal("encoder.pos_conv_embed.conv.parametrizations.weight.original1", (dim, 48, 128))
    for i in range(_W2V_LAYERS):
        p = f"encoder.layers.{i}"
        for m in ("k_proj", "v_proj", "q_proj", "out_proj"):
            w.linear(f"{p}.attention.{m}", dim, dim)
        w.norm(f"{p}.layer_norm", dim)
        w.linear(f"{p}.feed_forward.intermediate_dense", dim, 4 * dim)
        w.linear(f"{p}.feed_forward.output_dense", 4 * dim, dim)
        w.norm(f"{p}.final_layer_norm", dim)
    w.norm("encoder.layer_norm", dim)  # its size (768) selects wav2vec2-base


def _multitalk_patch(
    w: _Weights, *, in_dim: int = 160, intermediate: int = 16, out_dim: int = 16
) -> None:
    # ComfyUI fixes audio_window 5, vae_scale 4 (so 8 frames), 32 context tokens, 40 blocks
    # of 40 heads (so in_dim, which must equal the DiT dim, is a multiple of 40).
    per_frame = _W2V_LAYERS * _W2V_DIM
    w.linear("audio_proj.proj1", 5 * per_frame, intermediate)
    w.linear("audio_proj.proj1_vf", 8 * per_frame, intermediate)
    w.linear("audio_proj.proj2", intermediate, intermediate)
    w.linear("audio_proj.proj3", intermediate, 32 * out_dim)
    w.norm("audio_proj.norm", out_dim)
    for i in range(40):
        p = f"blocks.{i}"
        w.linear(f"{p}.audio_cross_attn.q_linear", in_dim, in_dim)
        w.linear(f"{p}.audio_cross_attn.proj", in_dim, in_dim)
        w.linear(f"{p}.audio_cross_attn.kv_linear", out_dim, 2 * in_dim)
        w.norm(f"{p}.norm_x", in_dim)


# --- CLIP ViT-H/14 (comfy/clip_model.py: CLIPVisionModelProjection, clip_vision_config_h) ---


def _clip_vision_h(w: _Weights) -> None:
    dim, ffn, patch, patches = _CLIP_VISION_DIM, 5120, 14, (224 // 14) ** 2 + 1
    w.normal("vision_model.embeddings.class_embedding", (dim,))
    w.normal("vision_model.embeddings.patch_embedding.weight", (dim, 3, patch, patch))
    w.normal("vision_model.embeddings.position_embedding.weight", (patches, dim))
    w.norm("vision_model.pre_layrnorm", dim)
    for i in range(32):
        p = f"vision_model.encoder.layers.{i}"
        for name, n_in, n_out in (
            *((f"self_attn.{m}", dim, dim) for m in ("q_proj", "k_proj", "v_proj", "out_proj")),
            ("mlp.fc1", dim, ffn),
            ("mlp.fc2", ffn, dim),
        ):
            w.const(f"{p}.{name}.weight", (n_out, n_in), 0.0)
            w.const(f"{p}.{name}.bias", (n_out,), 0.0)
        w.norm(f"{p}.layer_norm1", dim)
        w.norm(f"{p}.layer_norm2", dim)
    w.norm("vision_model.post_layernorm", dim)
    w.const("visual_projection.weight", (1024, dim), 0.0)


@dataclass(frozen=True)
class _Kind:
    build: Callable[[_Weights], None]
    dtype: str  # a torch dtype's name
    config: str | None = None  # the safetensors metadata `config`


_KINDS: dict[str, _Kind] = {
    "wan22_ti2v_dit": _Kind(
        partial(_wan_dit, in_dim=48, out_dim=48, dim=128), "float16", _dit_config(128)
    ),
    "wan_a14b_dit": _Kind(
        partial(_wan_dit, in_dim=36, out_dim=16, dim=160), "float16", _dit_config(160)
    ),
    "wan_a14b_t2v_dit": _Kind(
        partial(_wan_dit, in_dim=16, out_dim=16, dim=160), "float16", _dit_config(160)
    ),
    "wan21_i2v_dit": _Kind(
        partial(_wan_dit, in_dim=36, out_dim=16, dim=160, i2v=True), "float16", _dit_config(160)
    ),
    "wan_lora": _Kind(partial(_wan_lora, dim=160), "float16"),
    "wan_lora_128": _Kind(partial(_wan_lora, dim=128), "float16"),
    "umt5_xxl": _Kind(_t5_base, "float8_e4m3fn"),
    "wan22_vae": _Kind(_taehv48, "float16"),
    "wan21_vae": _Kind(_wan21_vae, "float16"),
    "wav2vec2_base": _Kind(_wav2vec2_base, "float8_e4m3fn"),
    "infinitetalk_patch": _Kind(_multitalk_patch, "float16"),
    "clip_vision_h": _Kind(_clip_vision_h, "float16"),
}

TINY_KINDS: tuple[str, ...] = tuple(_KINDS)


def _kind(kind: str) -> _Kind:
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown tiny kind {kind!r}; known: {', '.join(TINY_KINDS)}") from None


def _read_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file's header; None if unreadable or not one."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER_BYTES:
                return None
            raw = f.read(size)
        if len(raw) != size:
            return None
        header = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return None
    return {str(k): str(v) for k, v in metadata.items()}


def is_tiny(path: Path) -> bool:
    """Whether `path` is a safetensors file written here (reads only its header).

    False for a missing file, a file that is not safetensors, and real weights.
    """
    metadata = _read_metadata(path)
    return metadata is not None and metadata.get(TINY_TAG) == "1"


def _is_current(path: Path, kind: str, seed: int) -> bool:
    metadata = _read_metadata(path)
    return (
        metadata is not None
        and metadata.get(TINY_TAG) == "1"
        and (
            metadata.get(_KIND_KEY),
            metadata.get(_VERSION_KEY),
            metadata.get(_SEED_KEY),
        )
        == (kind, _VERSION, str(seed))
    )


def _refuse_real(path: Path) -> None:
    if (path.exists() or path.is_symlink()) and not is_tiny(path):
        raise ValueError(
            f"refusing to overwrite {path}: it exists and is not a tiny test weight "
            f"(no {TINY_TAG!r} tag in its safetensors metadata), so it may be a real model file"
        )


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_tiny(kind: str, path: Path, *, seed: int = 0) -> None:
    """Write a tiny model file of `kind` at `path`: atomically, mode 0644, same bytes for a seed.

    Raises ValueError for an unknown kind, or if `path` exists and is not tiny (a real file).
    """
    import torch

    spec = _kind(kind)
    path = Path(path)
    _refuse_real(path)
    weights = _Weights(_mixed_seed(kind, seed), getattr(torch, spec.dtype))
    spec.build(weights)
    metadata = {TINY_TAG: "1", _KIND_KEY: kind, _VERSION_KEY: _VERSION, _SEED_KEY: str(seed)}
    if spec.config is not None:
        metadata["config"] = spec.config
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(path)
    try:
        _save(weights.tensors, tmp, metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_SAFETENSORS_DTYPES = {
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float8_e4m3fn": "F8_E4M3",
}


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file with a sorted header, so that a seed always gives the same bytes.

    (safetensors' own `save_file` orders the metadata at random and creates 0600 files.)
    """
    import torch

    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    names = sorted(tensors)
    offset = 0
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:  # little-endian, as on every machine we run on
            tensor = tensors[name]
            if tensor.numel() > 4096 and not torch.any(tensor):  # a hole reads as zeros
                f.seek(tensor.numel() * tensor.element_size(), os.SEEK_CUR)
                continue
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.truncate()


def _mixed_seed(kind: str, seed: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(kind.encode())) % 2**63


def _place(source: Path, dest: Path) -> None:
    """Hard-link `source` at `dest` (a copy where links fail), replacing `dest` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(dest)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def materialize(
    entries: Iterable[tuple[str, Path]], cache_dir: Path | None = None, *, seed: int = 0
) -> None:
    """Place a tiny file of each (kind, path), generating each kind at most once.

    Each kind is written once (into `cache_dir` as `<kind>.v<version>.seed<seed>.safetensors`,
    reused by later calls, or else at its first path) and hard-linked (copied where a link
    fails) to every other path. A path that already holds this kind, version and seed is left
    alone; a tiny file of another kind, version or seed is replaced. Raises ValueError before
    writing anything if a path exists and is not tiny (a real weight file), if a kind is
    unknown, or if one path is asked for with two kinds.
    """
    wanted: dict[Path, str] = {}
    for kind, raw_path in entries:
        path = Path(raw_path)
        _kind(kind)
        if wanted.setdefault(path, kind) != kind:
            raise ValueError(f"{path} is asked for as both {wanted[path]!r} and {kind!r}")
        _refuse_real(path)
    by_kind: dict[str, list[Path]] = {}
    for path, kind in wanted.items():
        if not _is_current(path, kind, seed):
            by_kind.setdefault(kind, []).append(path)
    for kind, paths in by_kind.items():
        if cache_dir is not None:
            source = Path(cache_dir) / f"{kind}.v{_VERSION}.seed{seed}.safetensors"
            if not _is_current(source, kind, seed):
                write_tiny(kind, source, seed=seed)
        else:
            source, paths = paths[0], paths[1:]
            write_tiny(kind, source, seed=seed)
        for path in paths:
            _place(source, path)


def main(argv: list[str] | None = None) -> None:
    """`python tiny_weights.py CACHE_DIR ENTRIES_JSON [SEED]`: `materialize` in another
    interpreter. The file needs only the standard library and torch, so the ComfyUI
    images run it with ComfyUI's Python (their API venv has no torch)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise SystemExit("usage: tiny_weights.py CACHE_DIR ENTRIES_JSON [SEED]")
    entries = [(str(kind), Path(path)) for kind, path in json.loads(args[1])]
    materialize(entries, Path(args[0]), seed=int(args[2]) if len(args) == 3 else 0)


if __name__ == "__main__":
    main()
