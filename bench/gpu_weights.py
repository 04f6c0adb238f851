"""Full-size random-weight model files in the real layouts, for timing the services on a GPU
where nothing can be downloaded (issue 12). The time of a pass does not depend on the
weights' values, so files of the real architectures, key names, shapes and dtypes load
through the services' real paths and cost what the real ones cost.

- `qwen_folder`: a Qwen-Image-Edit(-2509) diffusers folder (transformer 20.4 B, Qwen2.5-VL
  7B text encoder, VAE, scheduler, tokenizer, processor), loaded by the service's
  `Pipeline.from_pretrained`. Its tokenizer is the tiny model's (a few hundred tokens:
  prompts cost fewer tokens than with the real one, which does not change the transformer).
- `comfy_files`: ComfyUI files named as in a service's manifest: the Wan DiT, UMT5-XXL
  (fp8 e4m3fn, not the scaled variant), the Wan2.2 VAE; the key names and shapes are taken
  from ComfyUI's own classes (built on the meta device), so this needs `comfyui_dir`.

`fill="random"` writes normal(0, 0.02) values drawn on the GPU (norms 1); `fill="zeros"`
writes the header only and leaves the data as a hole (a sparse file of zeros, no disk
used), for a disk too small for the real sizes. Each file carries the safetensors metadata
`model_service_bench` = "1".
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from gpu_dit import QWEN

_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.uint8: "U8",
    torch.int64: "I64",
}
_STD = 0.02

Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def spec_of(module: torch.nn.Module, dtype: torch.dtype) -> Spec:
    """Name -> (dtype, shape) of a module's state dict, floating tensors in `dtype`."""
    return {
        name: (dtype if t.is_floating_point() else t.dtype, tuple(t.shape))
        for name, t in module.state_dict().items()
    }


def spec_bytes(spec: Spec) -> int:
    return sum(math.prod(shape) * _size(dtype) for dtype, shape in spec.values())


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: Path,
    spec: Spec,
    fill: str,
    extra: dict[str, torch.Tensor] | None = None,
    device: str = "cuda",
) -> int:
    """Write `spec` (+ `extra`, given tensors) as one safetensors file; returns its size."""
    extra = extra or {}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "model_service_bench": "1"}}
    offset = 0
    order = [*spec, *extra]
    for name in order:
        dtype, shape = (
            (extra[name].dtype, tuple(extra[name].shape)) if name in extra else spec[name]
        )
        end = offset + math.prod(shape) * _size(dtype)
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        start = f.tell()
        if fill == "zeros":  # a hole: reads as zeros, takes no disk
            f.truncate(start + offset)
            f.seek(start + offset)
        for name in order if fill != "zeros" else [n for n in order if n in extra]:
            if name in extra:
                tensor = extra[name].contiguous()
                f.seek(start + header[name]["data_offsets"][0])
            else:
                tensor = _random(name, *spec[name], device)
            f.write(tensor.cpu().reshape(-1).view(torch.uint8).numpy().data)
    tmp.rename(path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to the service
    return path.stat().st_size


def _random(name: str, dtype: torch.dtype, shape: tuple[int, ...], device: str) -> torch.Tensor:
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) <= 1 and ("norm" in name or name.endswith(("gamma", "alpha"))):
        values = torch.ones(shape, dtype=torch.bfloat16, device=device)
    else:
        values = torch.randn(shape, dtype=torch.bfloat16, device=device).mul_(_STD)
    return values.to(dtype)


@contextlib.contextmanager
def _meta() -> Iterator[None]:
    with torch.device("meta"):
        yield


# --- Qwen-Image-Edit ------------------------------------------------------------------

QWEN_TRANSFORMER = {**QWEN, "guidance_embeds": False}  # gpu_dit.py's real config
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128000,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}
QWEN_SCHEDULER = {  # Qwen/Qwen-Image-Edit's scheduler_config.json
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def qwen_folder(folder: Path, variant: str, fill: str, small: bool = False) -> dict[str, int]:
    """Write the pipeline folder; returns bytes per component. `small`: tiny sizes (a CPU
    check of this code, and of the layout, in the test environment)."""
    import diffusers
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qwen-image-edit-nunchaku"))
    from qwen_image_edit.manifest import VARIANTS
    from qwen_image_edit.tiny_model import _tokenizer, _video_processor, apply_torchvision_shim

    apply_torchvision_shim()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = _tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text, vision, transformer_config = QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION, QWEN_TRANSFORMER
    if small:
        text = {
            **text,
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
            "rope_parameters": {**text["rope_parameters"], "mrope_section": [2, 3, 3]},
        }  # type: ignore[dict-item]
        vision = {
            **vision,
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        }
        transformer_config = {**transformer_config, "num_layers": 2, "attention_head_dim": 16,
                              "num_attention_heads": 2, "joint_attention_dim": 64,
                              "axes_dims_rope": (4, 6, 6)}  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config={
            **text,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with _meta():
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)  # type: ignore[no-untyped-call]
        transformer = diffusers.QwenImageTransformer2DModel(**transformer_config)  # type: ignore[no-untyped-call]
        vae = diffusers.AutoencoderKLQwenImage()  # type: ignore[no-untyped-call]
    image_processor = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Qwen2VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor, tokenizer=tokenizer, **_video_processor()
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)  # type: ignore[no-untyped-call]
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, model, filename in (
        ("transformer", transformer, "diffusion_pytorch_model.safetensors"),
        ("vae", vae, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", text_encoder, "model.safetensors"),
    ):
        target = folder / name
        sizes[name] = write_safetensors(
            target / filename, spec_of(model, torch.bfloat16), fill, device=device
        )
        if name == "text_encoder":
            model.config.save_pretrained(target)
        else:
            model.save_config(target)
    tokenizer.save_pretrained(folder / "tokenizer")
    processor.save_pretrained(folder / "processor")
    scheduler.save_config(folder / "scheduler")
    pipeline_class = getattr(diffusers, VARIANTS[variant].pipeline_class)
    pipe = pipeline_class(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    pipe.save_config(folder)  # model_index.json
    return sizes


# --- ComfyUI (FastWan2.2-TI2V-5B) -------------------------------------------------------


def _comfy(comfyui_dir: str) -> None:
    # ComfyUI's `comfy` is a namespace package: bench/comfy.py would shadow it
    here = Path(__file__).resolve().parent
    sys.path[:] = [comfyui_dir, *(p for p in sys.path if Path(p or ".").resolve() != here)]
    argv, sys.argv = sys.argv, [sys.argv[0], *([] if torch.cuda.is_available() else ["--cpu"])]
    try:  # ComfyUI parses its arguments on import
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args
    finally:
        sys.argv = argv


def _spiece_model() -> torch.Tensor:
    """A 64-piece SentencePiece unigram model, in the tensor ComfyUI reads the UMT5
    tokenizer from (ids: pad 0, eos 1, unk 2, as T5's)."""
    import sentencepiece

    model = io.BytesIO()
    lines = [f"a video of a red fox running through snow number {i}" for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=64, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    return torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8)


FASTWAN_DIT = "Wan2_2-TI2V-5B-FastWanFullAttn_bf16.safetensors"


def comfy_files(
    models_dir: Path, comfyui_dir: str, fill: str, small: bool = False
) -> dict[str, int]:
    """FastWan2.2-TI2V-5B's three files under `models_dir` (the manifest's names)."""
    _comfy(comfyui_dir)
    import comfy.ldm.wan.model
    import comfy.ldm.wan.vae2_2
    import comfy.ops
    import comfy.text_encoders.t5

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ops = comfy.ops.disable_weight_init
    dit = {"dim": 3072, "ffn_dim": 14336, "num_heads": 24, "num_layers": 30}
    if small:
        dit = {"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2}
    t5_config = json.loads(
        (Path(comfyui_dir) / "comfy" / "text_encoders" / "umt5_config_xxl.json").read_text()
    )
    with _meta():
        model = comfy.ldm.wan.model.WanModel(
            model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=48, out_dim=48,
            freq_dim=256, text_dim=4096, operations=ops, dtype=torch.bfloat16, **dit,
        )  # fmt: skip
        vae = comfy.ldm.wan.vae2_2.WanVAE(
            dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0,
        )  # fmt: skip
        t5 = comfy.text_encoders.t5.T5(t5_config, torch.float8_e4m3fn, "meta", ops)
    sizes = {}
    files = (
        (f"diffusion_models/{FASTWAN_DIT}", model, torch.bfloat16, None),
        ("vae/wan2.2_vae.safetensors", vae, torch.bfloat16, None),
        ("text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", t5, torch.float8_e4m3fn,
         {"spiece_model": _spiece_model()}),
    )  # fmt: skip
    for relpath, module, dtype, extra in files:
        spec = spec_of(module, dtype)
        if small and relpath.startswith("text_encoders"):  # a CPU check: skip its 5.7 GB
            spec = dict(list(spec.items())[:4])
        sizes[relpath] = write_safetensors(models_dir / relpath, spec, fill, extra, device)
    return sizes


WAN14B_T2V = {  # Wan2.2-A14B text-to-video experts; the service's t2v workflow names them
    "high": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
    "low": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
}
WAN14B_LORAS = {
    "high": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
    "low": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
}
_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                 "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip


def wan14b_files(models_dir: Path, comfyui_dir: str, fill: str, rank: int = 128) -> dict[str, int]:
    """Wan2.2-A14B text-to-video: two experts (fp8 e4m3fn, not the scaled variant), their
    4-step LoRAs (rank `rank` on every block's attention and FFN matrices) and the Wan2.1
    VAE, under `models_dir` with the names of the service's manifest."""
    _comfy(comfyui_dir)
    import comfy.ldm.wan.model
    import comfy.ldm.wan.vae
    import comfy.ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with _meta():
        expert = comfy.ldm.wan.model.WanModel(
            model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, out_dim=16,
            dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096, num_heads=40, num_layers=40,
            operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16,
        )  # fmt: skip
        vae = comfy.ldm.wan.vae.WanVAE(
            dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0,
        )  # fmt: skip
    expert_spec = spec_of(expert, torch.float8_e4m3fn)
    lora: Spec = {}
    for name, (_, shape) in expert_spec.items():
        target = name.removesuffix(".weight")
        if name.startswith("blocks.") and target.endswith(_LORA_TARGETS) and len(shape) == 2:
            out_dim, in_dim = shape
            lora[f"diffusion_model.{target}.lora_down.weight"] = (torch.bfloat16, (rank, in_dim))
            lora[f"diffusion_model.{target}.lora_up.weight"] = (torch.bfloat16, (out_dim, rank))
            lora[f"diffusion_model.{target}.alpha"] = (torch.float32, ())
    sizes = {}
    for which in ("high", "low"):
        path = models_dir / "diffusion_models" / WAN14B_T2V[which]
        sizes[str(path)] = write_safetensors(path, expert_spec, fill, device=device)
        path = models_dir / "loras" / WAN14B_LORAS[which]
        sizes[str(path)] = write_safetensors(path, lora, fill, device=device)
    path = models_dir / "vae" / "wan_2.1_vae.safetensors"
    sizes[str(path)] = write_safetensors(path, spec_of(vae, torch.bfloat16), fill, device=device)
    return sizes


def fill_for(folder: Path, need_bytes: int, margin: int = 8 << 30) -> str:
    """`random` when the disk has room for the files (plus a margin), else `zeros`."""
    folder.mkdir(parents=True, exist_ok=True)
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    return "random" if free > need_bytes + margin else "zeros"
