"""GPU: seconds per denoising pass and peak memory of the services' diffusion transformers
at full size (issue 12's first figures), on random weights of the real architectures (the
speed of a pass does not depend on the weights' values; no download is possible there).

- Qwen-Image-Edit's `QwenImageTransformer2DModel` (60 layers, ~20B parameters, bf16) on
  an edit of about 1 MP: 1024x1024 output tokens plus the conditioning image's tokens
  (Edit concatenates them), and a prompt of 256 tokens. A default job runs 40-50 steps
  of 2 passes (true_cfg_scale > 1).
- FastWan2.2-TI2V-5B's `WanTransformer3DModel` (30 layers, bf16) on a 5 s 720p video
  (121 frames: latent 31 x 44 x 80, 27,280 tokens after the 1x2x2 patch), 512 text
  tokens. FastWan runs 3 steps of 1 pass; FastVideo publishes 2.64 s of denoising on an
  H200 with FA3 + torch.compile, 4.67 s with FA2.

Prints, per model: build time, the mean of timed passes after warm-ups, peak memory.
`--tiny` runs the same code on tiny configs on the CPU (a check of this script).

Usage (GPU machine): `python bench/gpu_dit.py [--passes 5] [--out gpu-dit.json]`
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

QWEN = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "axes_dims_rope": (16, 56, 56),
}
QWEN_TINY = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 3,
    "joint_attention_dim": 16,
    "axes_dims_rope": (8, 4, 4),
}
WAN_5B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "in_channels": 48,
    "out_channels": 48,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 14336,
    "num_layers": 30,
}
WAN_14B = {  # one expert of Wan2.2-A14B (I2V: 36 input channels); the two take turns
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
}
WAN_TINY = {
    **WAN_5B,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 8,
    "out_channels": 8,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, passes: int, warmup: int, step: Any) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            step()
        sync(device)
        times = []
        for _ in range(passes):
            started = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - started)
    return times


COMPILE = False  # --compile: torch.compile each model (its first passes compile it)


def build(cls: Any, config: dict[str, Any], device: str, dtype: torch.dtype) -> tuple[Any, float]:
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    if COMPILE:
        model = torch.compile(model)
    sync(device)
    return model, time.perf_counter() - started


def qwen(device: str, dtype: torch.dtype, tiny: bool, passes: int, warmup: int) -> dict[str, Any]:
    from diffusers import QwenImageTransformer2DModel

    config = QWEN_TINY if tiny else QWEN
    model, build_s = build(QwenImageTransformer2DModel, config, device, dtype)
    side = 8 if tiny else 64  # latent patches per side: 1024 px / 8 (VAE) / 2 (patch)
    text = 16 if tiny else 256
    tokens = 2 * side * side  # the output image's tokens, then the conditioning image's
    hidden = torch.randn(1, tokens, config["in_channels"], device=device, dtype=dtype)
    prompt = torch.randn(1, text, config["joint_attention_dim"], device=device, dtype=dtype)
    mask = torch.ones(1, text, device=device, dtype=torch.long)
    timestep = torch.tensor([0.5], device=device, dtype=dtype)
    shapes = [[(1, side, side), (1, side, side)]]

    def step() -> None:
        model(
            hidden_states=hidden,
            encoder_hidden_states=prompt,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=shapes,
            return_dict=False,
        )

    times = timed(device, passes, warmup, step)
    return {
        "model": "Qwen-Image-Edit transformer (QwenImageTransformer2DModel)",
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
        "image_tokens": tokens,
        "text_tokens": text,
        "build_s": round(build_s, 1),
        "pass_s": round(sum(times) / len(times), 4),
        "passes": len(times),
    }


def wan(device: str, dtype: torch.dtype, tiny: bool, passes: int, warmup: int) -> dict[str, Any]:
    """FastWan2.2-5B: 121 frames of 1280x704 (Wan2.2's VAE: 4x in time, 16x in space)."""
    return wan_pass(
        device,
        dtype,
        WAN_TINY if tiny else WAN_5B,
        (2, 4, 4) if tiny else (31, 44, 80),
        "FastWan2.2-TI2V-5B transformer (WanTransformer3DModel)",
        tiny,
        passes,
        warmup,
    )


def wan14b(device: str, dtype: torch.dtype, tiny: bool, passes: int, warmup: int) -> dict[str, Any]:
    """One Wan2.2-A14B expert, 81 frames at 480p (832x480) and 720p (1280x720); Wan2.1's VAE:
    4x in time, 8x in space. A lightning job runs 4 passes (2 per expert), cfg 1."""
    results = {}
    for name, latent in (("480p", (21, 60, 104)), ("720p", (21, 90, 160))):
        shape = (2, 4, 4) if tiny else latent
        results[name] = wan_pass(
            device,
            dtype,
            WAN_TINY if tiny else WAN_14B,
            shape,
            "Wan2.2-A14B expert (WanTransformer3DModel)",
            tiny,
            passes,
            warmup,
        )
    return {"model": "Wan2.2-A14B expert (WanTransformer3DModel)", **results}


def wan_pass(
    device: str,
    dtype: torch.dtype,
    config: dict[str, Any],
    shape: tuple[int, int, int],
    label: str,
    tiny: bool,
    passes: int,
    warmup: int,
) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    model, build_s = build(WanTransformer3DModel, config, device, dtype)
    frames, height, width = shape
    text = 16 if tiny else 512
    latent = torch.randn(
        1, config["in_channels"], frames, height, width, device=device, dtype=dtype
    )
    prompt = torch.randn(1, text, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)

    def step() -> None:
        model(
            hidden_states=latent, timestep=timestep, encoder_hidden_states=prompt, return_dict=False
        )

    times = timed(device, passes, warmup, step)
    return {
        "model": label,
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
        "video_tokens": frames * (height // 2) * (width // 2),
        "text_tokens": text,
        "build_s": round(build_s, 1),
        "pass_s": round(sum(times) / len(times), 4),
        "passes": len(times),
    }


WAN22_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
}
WAN21_VAE = {"base_dim": 96, "z_dim": 16}
VAE_TINY = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1]}


def vae(device: str, dtype: torch.dtype, tiny: bool, passes: int, warmup: int) -> dict[str, Any]:
    """The VAE decode after denoising: Wan2.2's (FastWan) on 121 frames of 1280x704, and
    Wan2.1's (Wan2.2-A14B, InfiniteTalk) on 81 frames at 480p and 720p."""

    cases = {
        "wan2.2 vae, 121 f 1280x704": (WAN22_VAE, (48, 31, 44, 80)),
        "wan2.1 vae, 81 f 832x480": (WAN21_VAE, (16, 21, 60, 104)),
        "wan2.1 vae, 81 f 1280x720": (WAN21_VAE, (16, 21, 90, 160)),
    }
    results: dict[str, Any] = {"model": "Wan VAE decode (AutoencoderKLWan)"}
    for name, (config, shape) in cases.items():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results[name] = _decode(
            device, dtype, VAE_TINY if tiny else config, shape, tiny, passes, warmup
        )
    return results


UMT5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "d_kv": 64,
    "vocab_size": 256384,
    "feed_forward_proj": "gated-gelu",
}
UMT5_TINY = {
    **UMT5_XXL,
    "d_model": 32,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "d_kv": 16,
    "vocab_size": 1000,
}


def text(device: str, dtype: torch.dtype, tiny: bool, passes: int, warmup: int) -> dict[str, Any]:
    """The Wan services' text encoder: UMT5-XXL's encoder on a 512-token prompt (twice a
    job when cfg > 1: prompt and negative prompt)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**(UMT5_TINY if tiny else UMT5_XXL))
    model, build_s = build(UMT5EncoderModel, {"config": config}, device, dtype)
    ids = torch.randint(0, config.vocab_size, (1, 512), device=device)
    times = timed(device, passes, warmup, lambda: model(input_ids=ids))
    return {
        "model": "UMT5-XXL encoder (UMT5EncoderModel)",
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
        "text_tokens": 512,
        "build_s": round(build_s, 1),
        "pass_s": round(sum(times) / len(times), 4),
        "passes": len(times),
    }


def _decode(
    device: str,
    dtype: torch.dtype,
    config: dict[str, Any],
    shape: tuple[int, int, int, int],
    tiny: bool,
    passes: int,
    warmup: int,
) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan

    model, _ = build(AutoencoderKLWan, config, device, dtype)
    z = config["z_dim"] if tiny else shape[0]
    latent = torch.randn(1, z, *((2, 4, 4) if tiny else shape[1:]), device=device, dtype=dtype)
    times = timed(device, passes, warmup, lambda: model.decode(latent, return_dict=False))
    result: dict[str, Any] = {"decode_s": round(sum(times) / len(times), 3), "passes": len(times)}
    if device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=["qwen", "wan", "wan14b", "vae", "text"], default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    args = parser.parse_args()
    global COMPILE
    COMPILE = args.compile
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    results = []
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    measures = (("qwen", qwen), ("wan", wan), ("wan14b", wan14b), ("vae", vae), ("text", text))
    for name, measure in measures:
        if args.only not in (None, name):
            continue
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = measure(device, dtype, args.tiny, args.passes, args.warmup)
        if device == "cuda":
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["device"] = torch.cuda.get_device_name()
        result["torch"] = torch.__version__
        result["compiled"] = COMPILE
        results.append(result)
        print(json.dumps(result), flush=True)
        del measure
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
