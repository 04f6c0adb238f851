"""Tiny Wan-family weights: the keys and shapes ComfyUI 0.33's detection reads, the tag,
determinism, and materialize's links and refusals. (Loading them in a real ComfyUI was
checked by hand; see the module docstring.)"""

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from model_service.comfy.tiny_weights import (
    TINY_KINDS,
    TINY_TAG,
    is_tiny,
    materialize,
    write_tiny,
)

BIG_KINDS = ("umt5_xxl", "wav2vec2_base")


def header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        parsed: dict[str, Any] = json.loads(f.read(size))
    return parsed


def shapes(path: Path) -> dict[str, list[int]]:
    return {k: v["shape"] for k, v in header(path).items() if k != "__metadata__"}


# What ComfyUI 0.33 reads to pick and size each architecture (comfy/model_detection.py,
# comfy/sd.py, comfy_extras/nodes_model_patch.py, comfy/audio_encoders), plus a few more.
EXPECTED: dict[str, dict[str, list[int]]] = {
    "wan22_ti2v_dit": {
        "head.modulation": [1, 2, 128],
        "head.head.weight": [4 * 48, 128],
        "patch_embedding.weight": [128, 48, 1, 2, 2],
        "blocks.0.ffn.0.weight": [256, 128],
        "text_embedding.0.weight": [128, 768],
    },
    "wan_a14b_dit": {
        "head.modulation": [1, 2, 160],
        "head.head.weight": [4 * 16, 160],
        "patch_embedding.weight": [160, 36, 1, 2, 2],
        "text_embedding.0.weight": [160, 768],
    },
    "wan_a14b_t2v_dit": {
        "head.modulation": [1, 2, 160],
        "head.head.weight": [4 * 16, 160],
        "patch_embedding.weight": [160, 16, 1, 2, 2],
    },
    "wan21_i2v_dit": {
        "head.modulation": [1, 2, 160],
        "patch_embedding.weight": [160, 36, 1, 2, 2],
        "img_emb.proj.0.bias": [1280],
        "img_emb.proj.3.weight": [160, 1280],
        "blocks.0.cross_attn.k_img.weight": [160, 160],
    },
    "wan_lora": {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": [4, 160],
        "diffusion_model.blocks.0.cross_attn.o.lora_up.weight": [160, 4],
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": [320, 4],
        "diffusion_model.blocks.0.ffn.2.lora_down.weight": [4, 320],
        "diffusion_model.blocks.0.ffn.2.alpha": [],
    },
    "wan_lora_128": {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": [4, 128],
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": [256, 4],
    },
    "umt5_xxl": {
        "encoder.block.0.layer.0.SelfAttention.k.weight": [768, 768],
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": [32, 12],
        "encoder.block.11.layer.1.DenseReluDense.wi.weight": [3072, 768],
        "encoder.final_layer_norm.weight": [768],
        "shared.weight": [32128, 768],
    },
    "wan22_vae": {
        "decoder.22.bias": [12],
        "decoder.22.weight": [12, 64, 3, 3],
        "decoder.1.weight": [256, 48, 3, 3],
        "encoder.0.weight": [64, 12, 3, 3],
        "encoder.17.weight": [48, 64, 3, 3],
    },
    "wan21_vae": {
        "decoder.middle.0.residual.0.gamma": [16, 1, 1, 1],
        "decoder.head.0.gamma": [4, 1, 1, 1],
        "decoder.head.2.weight": [3, 4, 3, 3, 3],
        "encoder.conv1.weight": [4, 3, 3, 3, 3],
        "decoder.conv1.weight": [16, 16, 3, 3, 3],
    },
    "wav2vec2_base": {
        "encoder.layer_norm.bias": [768],
        "encoder.layers.11.feed_forward.output_dense.weight": [768, 3072],
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1": [768, 48, 128],
        "feature_extractor.conv_layers.0.conv.weight": [512, 1, 10],
    },
    "infinitetalk_patch": {
        "audio_proj.proj1.weight": [16, 5 * 12 * 768],
        "audio_proj.proj1_vf.weight": [16, 8 * 12 * 768],
        "audio_proj.norm.weight": [16],
        "blocks.0.audio_cross_attn.proj.weight": [160, 160],
        "blocks.39.audio_cross_attn.kv_linear.weight": [320, 16],
    },
    # ComfyUI picks clip_vision_config_h from `layers.30`; Wan's img_emb takes 1280-d
    "clip_vision_h": {
        "vision_model.embeddings.patch_embedding.weight": [1280, 3, 14, 14],
        "vision_model.embeddings.position_embedding.weight": [257, 1280],
        "vision_model.encoder.layers.30.layer_norm1.weight": [1280],
        "vision_model.encoder.layers.31.mlp.fc1.weight": [5120, 1280],
        "visual_projection.weight": [1024, 1280],
    },
}

# Keys that must NOT be there (they would switch ComfyUI to another architecture).
ABSENT: dict[str, list[str]] = {
    "wan22_ti2v_dit": ["blocks.1.modulation", "img_emb.proj.0.bias"],
    "wan_a14b_dit": ["img_emb.proj.0.bias"],
    "wan_a14b_t2v_dit": ["img_emb.proj.0.bias"],
    # T5_XXL detection (then a fixed 4096-d UMT5-XXL), and the spiece tokenizer
    "umt5_xxl": [
        "encoder.block.23.layer.1.DenseReluDense.wi_1.weight",
        "encoder.block.12.layer.0.SelfAttention.k.weight",
        "spiece_model",
    ],
    # the real Wan2.2 VAE's keys (a fixed 705 M-parameter model)
    "wan22_vae": ["decoder.middle.0.residual.0.gamma"],
    "wan21_vae": ["decoder.upsamples.0.upsamples.0.residual.2.weight"],
    "infinitetalk_patch": ["blocks.40.norm_x.weight"],
    "clip_vision_h": ["vision_model.encoder.layers.32.layer_norm1.weight"],  # ViT-g has 48
}

DTYPES = {"umt5_xxl": "F8_E4M3", "wav2vec2_base": "F8_E4M3"}


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two 100 MB kinds, generated once for the module."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    materialize([(kind, cache / "placed" / f"{kind}.safetensors") for kind in BIG_KINDS], cache)
    return cache


def test_every_kind_is_covered() -> None:
    assert set(EXPECTED) == set(TINY_KINDS)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_kind_has_the_keys_comfyui_detects(kind: str, tmp_path: Path, big_cache: Path) -> None:
    if kind in BIG_KINDS:
        path = big_cache / "placed" / f"{kind}.safetensors"
    else:
        path = tmp_path / "sub" / f"{kind}.safetensors"
        write_tiny(kind, path)
    assert is_tiny(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    got = shapes(path)
    for key, shape in EXPECTED[kind].items():
        assert got.get(key) == shape, key
    for key in ABSENT.get(kind, []):
        assert key not in got
    dtypes = {v["dtype"] for k, v in header(path).items() if k != "__metadata__"}
    assert dtypes == {DTYPES.get(kind, "F16")}
    metadata = header(path)["__metadata__"]
    assert metadata[TINY_TAG] == "1"
    assert metadata["model_service_tiny_kind"] == kind
    if kind.endswith("_dit"):
        config = json.loads(metadata["config"])["transformer"]
        assert config["text_dim"] == 768
        assert config["num_heads"] == 1
    else:
        assert "config" not in metadata
    assert not list(path.parent.glob(".*.tmp"))


def test_block_counts(tmp_path: Path, big_cache: Path) -> None:
    def blocks(path: Path, prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in shapes(path) if k.startswith(prefix)})

    t5 = big_cache / "placed" / "umt5_xxl.safetensors"
    assert blocks(t5, "encoder.block.") == 12
    w2v = big_cache / "placed" / "wav2vec2_base.safetensors"
    assert blocks(w2v, "encoder.layers.") == 12
    write_tiny("wan_a14b_dit", tmp_path / "dit.safetensors")
    assert blocks(tmp_path / "dit.safetensors", "blocks.") == 1
    write_tiny("wan_lora", tmp_path / "lora.safetensors")
    assert len(shapes(tmp_path / "lora.safetensors")) == 3 * 10
    write_tiny("infinitetalk_patch", tmp_path / "patch.safetensors")
    assert blocks(tmp_path / "patch.safetensors", "blocks.") == 40


def test_norms_are_one_and_the_taehv_output_is_lifted(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    write_tiny("wan22_vae", tmp_path / "vae.safetensors")
    vae = load_file(tmp_path / "vae.safetensors")
    assert torch.all(vae["decoder.22.bias"] == 0.5)
    assert vae["decoder.22.weight"].float().std() > 1.0
    write_tiny("wan21_i2v_dit", tmp_path / "dit.safetensors")
    dit = load_file(tmp_path / "dit.safetensors")
    assert torch.all(dit["blocks.0.self_attn.norm_q.weight"] == 1)
    assert torch.all(dit["img_emb.proj.4.bias"] == 0)
    assert 0.01 < dit["blocks.0.ffn.0.weight"].float().std() < 0.03


def test_clip_vision_h_is_full_size_but_its_zero_blocks_are_holes(tmp_path: Path) -> None:
    """ComfyUI builds CLIP-H at its real size, so the file has every real shape (1.26 GB),
    but the 32 blocks' matrices are zeros (identity blocks), written as holes."""
    from safetensors import safe_open

    path = tmp_path / "clip_vision_h.safetensors"
    write_tiny("clip_vision_h", path)
    assert path.stat().st_size > 1_264_000_000
    if hasattr(path.stat(), "st_blocks"):
        assert path.stat().st_blocks * 512 < 50_000_000
    with safe_open(str(path), "pt") as f:
        assert not torch.any(f.get_tensor("vision_model.encoder.layers.31.mlp.fc2.weight"))
        assert torch.all(f.get_tensor("vision_model.encoder.layers.0.layer_norm1.weight") == 1)
        patch = f.get_tensor("vision_model.embeddings.patch_embedding.weight").float()
        assert 0.01 < patch.std() < 0.03


def test_safetensors_reads_them_back(tmp_path: Path, big_cache: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(big_cache / "placed" / "umt5_xxl.safetensors"), "pt") as f:
        assert f.metadata()[TINY_TAG] == "1"
        norm = f.get_tensor("encoder.final_layer_norm.weight")
        assert norm.dtype == torch.float8_e4m3fn
        assert torch.all(norm.float() == 1)
        assert f.get_tensor("shared.weight").float().abs().max() > 0
    write_tiny("wan_lora", tmp_path / "lora.safetensors")
    lora = load_file(tmp_path / "lora.safetensors")
    alpha = lora["diffusion_model.blocks.0.ffn.0.alpha"]
    assert alpha.shape == ()
    assert alpha.item() == 4.0


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    write_tiny("wan21_vae", tmp_path / "a.safetensors", seed=3)
    write_tiny("wan21_vae", tmp_path / "b.safetensors", seed=3)
    write_tiny("wan21_vae", tmp_path / "c.safetensors", seed=4)
    a, b, c = ((tmp_path / f"{n}.safetensors").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    assert shapes(tmp_path / "a.safetensors") == shapes(tmp_path / "c.safetensors")


def test_is_tiny_is_false_for_other_files(tmp_path: Path) -> None:
    real = tmp_path / "real.safetensors"
    save_file({"w": torch.zeros(2)}, str(real), metadata={"format": "pt"})
    assert not is_tiny(real)
    untagged = tmp_path / "untagged.safetensors"
    save_file({"w": torch.zeros(2)}, str(untagged))
    assert not is_tiny(untagged)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff" * 64)
    assert not is_tiny(garbage)
    (tmp_path / "empty").write_bytes(b"")
    assert not is_tiny(tmp_path / "empty")
    assert not is_tiny(tmp_path / "missing.safetensors")


def test_materialize_generates_once_and_links(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    models = tmp_path / "models"
    high = models / "diffusion_models" / "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    low = models / "diffusion_models" / "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
    vae = models / "vae" / "wan_2.1_vae.safetensors"
    entries = [("wan_a14b_dit", high), ("wan_a14b_dit", low), ("wan21_vae", vae)]
    materialize(entries, cache)
    cached = sorted(p.name for p in cache.iterdir())
    assert [name.split(".")[0] for name in cached] == ["wan21_vae", "wan_a14b_dit"]
    assert all(name.endswith(".seed0.safetensors") for name in cached)
    source = cache / cached[1]
    assert high.samefile(source)
    assert low.samefile(source)
    assert all(is_tiny(p) for p in (high, low, vae))
    assert stat.S_IMODE(low.stat().st_mode) == 0o644

    inode = high.stat().st_ino
    materialize(entries, cache)  # all current: nothing rewritten
    assert high.stat().st_ino == inode

    # A tiny file of another kind (or seed) is ours to replace.
    write_tiny("wan_lora", high)
    materialize(entries, cache)
    assert high.samefile(source)
    materialize([("wan_a14b_dit", high)], cache, seed=1)
    assert (cache / cached[1].replace(".seed0.", ".seed1.")).samefile(high)
    assert header(high)["__metadata__"]["model_service_tiny_seed"] == "1"


def test_materialize_without_cache_links_to_the_first_path(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "x.safetensors", tmp_path / "b" / "y.safetensors"
    materialize([("wan_lora", first), ("wan_lora", second)], None)
    assert first.samefile(second)
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["a", "b", "x.safetensors", "y.safetensors"]


def test_materialize_refuses_a_real_file_and_writes_nothing(tmp_path: Path) -> None:
    real = tmp_path / "models" / "vae" / "wan_2.1_vae.safetensors"
    real.parent.mkdir(parents=True)
    save_file({"decoder.head.0.gamma": torch.ones(96, 1, 1, 1)}, str(real))
    before = real.read_bytes()
    other = tmp_path / "models" / "loras" / "l.safetensors"
    with pytest.raises(ValueError, match="refusing to overwrite .*wan_2.1_vae.safetensors"):
        materialize([("wan_lora", other), ("wan21_vae", real)], tmp_path / "cache")
    assert real.read_bytes() == before
    assert not other.exists()
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_tiny("wan21_vae", real)
    assert real.read_bytes() == before

    not_safetensors = tmp_path / "notes.txt"
    not_safetensors.write_text("hello")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        materialize([("wan_lora", not_safetensors)], None)
    assert not_safetensors.read_text() == "hello"


def test_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny kind 'sdxl'"):
        write_tiny("sdxl", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unknown tiny kind"):
        materialize([("sdxl", tmp_path / "x.safetensors")], None)
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="both 'wan_lora' and 'wan21_vae'"):
        materialize([("wan_lora", path), ("wan21_vae", path)], None)
    assert not path.exists()


def test_importing_the_module_does_not_import_torch() -> None:
    code = (
        "import sys, model_service.comfy.tiny_weights as t; "
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules; "
        "print(len(t.TINY_KINDS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == str(len(TINY_KINDS))
