"""Whether a LoRA fits its diffusion model, from the files' headers (model_service.lora_fit),
and ComfyUI's LoRA log lines as a job error (model_service.comfy.lora_log): tiny Wan model
files and LoRAs written here, in the formats ComfyUI 0.33 accepts for Wan; with
COMFYUI_TEST_DIR, the same LoRAs through the real ComfyUI's own `load_lora`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from model_service.comfy.lora_log import LoraLogWatch
from model_service.comfy.supervisor import ComfySupervisor, LaunchSpec
from model_service.comfy.tiny_weights import write_tiny
from model_service.errors import LoraInvalid
from model_service.lora_fit import (
    check_lora_fit,
    find_misfit,
    match,
    model_weights,
    read_shapes,
    weights_from_shapes,
)
from model_service_testing import machine
from model_service_testing.process import free_port

DIM = 160  # the tiny A14B expert (tiny_weights `wan_a14b_dit`): 1 block of dim 160
BLOCK = [f"{a}.{m}" for a in ("self_attn", "cross_attn") for m in "qkvo"]
SHAPES = {t: (DIM, DIM) for t in BLOCK} | {"ffn.0": (2 * DIM, DIM), "ffn.2": (DIM, 2 * DIM)}


def lora_file(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    rng = np.random.default_rng(0)
    save_file({k: rng.standard_normal(v).astype(np.float16) for k, v in tensors.items()}, path)
    return path


def pairs(
    name: str, up: str, down: str, *, dim: int = DIM, rank: int = 4, alpha: bool = True
) -> dict[str, tuple[int, ...]]:
    """A LoRA on the tiny block's 10 matrices: `name(target)` + up/down suffixes."""
    tensors: dict[str, tuple[int, ...]] = {}
    for target, (n_out, n_in) in SHAPES.items():
        n_out, n_in = n_out * dim // DIM, n_in * dim // DIM
        x = name.format(target=target, kohya=target.replace(".", "_"))
        tensors[x + up] = (n_out, rank)
        tensors[x + down] = (rank, n_in)
        if alpha:
            tensors[x + ".alpha"] = ()
    return tensors


PLAIN = "diffusion_model.blocks.0.{target}"
KOHYA = "lora_unet_blocks_0_{kohya}"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "expert.safetensors"
    write_tiny("wan_a14b_dit", path)
    return path


# LoRAs in the formats ComfyUI 0.33 loads for Wan, each with what it should make of them
FITTING = {
    "lora_up_down": pairs(PLAIN, ".lora_up.weight", ".lora_down.weight"),
    "lora_A_B": pairs(PLAIN, ".lora_B.weight", ".lora_A.weight", alpha=False),
    "kohya": pairs(KOHYA, ".lora_up.weight", ".lora_down.weight"),
    "wan_fun": pairs("lora_unet__blocks_0_{kohya}", ".lora_up.weight", ".lora_down.weight"),
    "mochi_A_B": pairs(PLAIN, ".lora_B", ".lora_A", alpha=False),
    "diff": {
        "diffusion_model.blocks.0.norm3.diff": (DIM,),
        "diffusion_model.blocks.0.norm3.diff_b": (DIM,),
        "diffusion_model.head.modulation.diff": (1, 2, DIM),
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": (2 * DIM, 4),
        "diffusion_model.blocks.0.ffn.0.lora_down.weight": (4, DIM),
        "diffusion_model.blocks.0.ffn.0.diff_b": (2 * DIM,),
    },
    "loha_kohya": {
        f"lora_unet_blocks_0_self_attn_q.hada_{n}": s
        for n, s in (("w1_a", (DIM, 4)), ("w1_b", (4, DIM)), ("w2_a", (DIM, 4)), ("w2_b", (4, DIM)))
    }
    | {"lora_unet_blocks_0_self_attn_q.alpha": ()},
}
OTHER_SIZE = pairs(PLAIN, ".lora_up.weight", ".lora_down.weight", dim=128)
OTHER_ARCH = {  # Flux-style names: nothing in a Wan model answers to them
    f"diffusion_model.double_blocks.0.img_attn.{m}.lora_{s}.weight": (DIM, 4)
    if s == "up"
    else (4, DIM)
    for m in ("qkv", "proj")
    for s in ("up", "down")
}
MISFITS = {
    "other_size": OTHER_SIZE,
    "kohya_other_size": pairs(KOHYA, ".lora_up.weight", ".lora_down.weight", dim=128),
    "lora_A_B_other_size": pairs(PLAIN, ".lora_B.weight", ".lora_A.weight", dim=128),
    "other_arch": OTHER_ARCH,
    "diffusers_names": pairs(
        "transformer.blocks.0.attn1.{kohya}", ".lora_B.weight", ".lora_A.weight", alpha=False
    ),
    "no_prefix": pairs("blocks.0.{target}", ".lora_B.weight", ".lora_A.weight", alpha=False),
    "one_block_too_many": pairs(PLAIN, ".lora_up.weight", ".lora_down.weight")
    | pairs("diffusion_model.blocks.1.{target}", ".lora_up.weight", ".lora_down.weight"),
    "diff_b_without_bias": {"diffusion_model.blocks.0.self_attn.norm_q.diff_b": (DIM,)},
    "diff_other_size": {"diffusion_model.blocks.0.norm3.diff": (128,)},
    "rank_mismatch": {
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": (2 * DIM, 4),
        "diffusion_model.blocks.0.ffn.0.lora_down.weight": (8, DIM),
    },
}


@pytest.mark.parametrize("name", list(FITTING))
def test_loras_in_every_wan_format_fit(name: str, model_file: Path, tmp_path: Path) -> None:
    lora = lora_file(tmp_path / f"{name}.safetensors", FITTING[name])
    assert find_misfit(read_shapes(lora), model_weights(model_file)) is None


def test_a_lora_for_another_size_names_the_first_key_and_the_shapes(
    model_file: Path, tmp_path: Path
) -> None:
    lora = lora_file(tmp_path / "l.safetensors", OTHER_SIZE)
    misfit = find_misfit(read_shapes(lora), model_weights(model_file))
    assert misfit is not None
    ups = [key for key in read_shapes(lora) if key.endswith(".lora_up.weight")]
    assert misfit.key == ups[0]  # the first in the file's own order
    assert misfit.details["model_shape"] != misfit.details["lora_shape"]
    assert "[160, 160]" in misfit.problem or "[320, 160]" in misfit.problem, misfit.problem


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("kohya_other_size", "update, but the model's"),
        ("lora_A_B_other_size", "update, but the model's"),
        ("other_arch", "none of its 4 tensors matches a layer"),
        ("diffusers_names", "none of its 20 tensors"),  # ComfyUI 0.33 has no diffusers map for Wan
        ("no_prefix", "none of its 20 tensors"),
        ("one_block_too_many", "30 of its 60 tensors match no layer"),
        ("diff_b_without_bias", "a tensor the model does not have"),
        ("diff_other_size", "is [128] but the model's 'diffusion_model.blocks.0.norm3.weight'"),
        ("rank_mismatch", "do not share a rank"),
    ],
)
def test_misfits_say_what_is_wrong(name: str, words: str, model_file: Path, tmp_path: Path) -> None:
    lora = lora_file(tmp_path / f"{name}.safetensors", MISFITS[name])
    misfit = find_misfit(read_shapes(lora), model_weights(model_file))
    assert misfit is not None
    assert words in misfit.problem, misfit.problem
    assert misfit.key in read_shapes(lora)


def test_a_transposed_pair_is_refused_though_comfyui_would_reshape_it() -> None:
    model = weights_from_shapes({"blocks.0.ffn.0.weight": (320, 160)})
    lora = {
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": (160, 4),
        "diffusion_model.blocks.0.ffn.0.lora_down.weight": (4, 320),
    }
    misfit = find_misfit(lora, model)
    assert misfit is not None
    assert "make a [160, 320] update" in misfit.problem


def test_a_checkpoint_prefix_is_taken_off_as_comfyui_does() -> None:
    bare = {f"blocks.0.{t}.weight": s for t, s in SHAPES.items()}
    prefixed = weights_from_shapes({f"model.diffusion_model.{k}": v for k, v in bare.items()})
    assert prefixed == weights_from_shapes(bare)
    assert "lora_unet_blocks_0_ffn_0" in prefixed.names


def test_the_model_table_is_read_once_per_file_version(tmp_path: Path) -> None:
    path = lora_file(tmp_path / "m.safetensors", {"blocks.0.ffn.0.weight": (8, 4)})
    first = model_weights(path)
    assert model_weights(path) is first
    lora_file(path, {"blocks.0.ffn.0.weight": (16, 4)})
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime
    assert model_weights(path).shapes["diffusion_model.blocks.0.ffn.0.weight"] == (16, 4)


def test_check_lora_fit_raises_lora_invalid_with_advice(model_file: Path, tmp_path: Path) -> None:
    lora = lora_file(tmp_path / "l.safetensors", OTHER_SIZE)
    with pytest.raises(LoraInvalid) as caught:
        check_lora_fit(
            lora,
            [model_file],
            field="input.loras[0].source",
            source="https://x/l",
            base="Wan2.2 A14B",
        )
    error = caught.value.to_dict()
    assert error["code"] == "lora_invalid"
    assert error["field"] == "input.loras[0].source"
    assert error["model_file"] == model_file.name
    assert error["key"].endswith(".lora_up.weight")
    assert "another model size or architecture" in error["message"]
    assert "use one trained for Wan2.2 A14B" in error["message"]


def test_a_model_file_without_a_header_is_not_checked(tmp_path: Path) -> None:
    placeholder = tmp_path / "sparse.safetensors"
    with placeholder.open("wb") as out:
        out.truncate(10**9)  # what place_sparse_models leaves: zeros, no header
    lora = lora_file(tmp_path / "l.safetensors", OTHER_ARCH)
    check_lora_fit(
        lora, [placeholder, tmp_path / "absent.safetensors"], field="f", source="s", base="b"
    )


# --- ComfyUI's log during a job ---------------------------------------------------------


SHAPE_ERROR = (  # as ComfyUI 0.33 prints it (app/logger.py: "[LEVEL] message")
    "[ERROR] ERROR lora diffusion_model.blocks.0.ffn.0.weight shape '[320, 160]' is invalid for "
    "input of size 40960"
)


def test_the_log_watch_keeps_only_its_own_prompts_lines() -> None:
    watch = LoraLogWatch()
    watch("[WARNING] lora key not loaded: from.the.prompt.before")
    watch("[INFO] Prompt executed in 1.00 seconds")  # the prompt ahead of ours ended
    watch("[INFO] got prompt")
    watch("[WARNING] lora key not loaded: ours.early")  # read before our start event
    watch.started()
    watch(SHAPE_ERROR)
    watch("[INFO] Requested to load WAN21")
    watch("[INFO] Prompt executed in 2.00 seconds")  # ours
    watch("[WARNING] lora key not loaded: the.next.prompt")
    assert watch.lines == ["[WARNING] lora key not loaded: ours.early", SHAPE_ERROR]
    assert watch.count == 2


@pytest.mark.parametrize(
    "line",
    [
        "[ERROR] ERROR loha diffusion_model.blocks.0.self_attn.q.weight shape '[160, 160]' is "
        "invalid for input of size 16384",
        "lora key not loaded: diffusion_model.blocks.1.ffn.0.alpha",  # a plain logging setup
        "[WARNING] WARNING SHAPE MISMATCH diffusion_model.blocks.0.norm3.weight WEIGHT NOT MERGED "
        "torch.Size([128]) != torch.Size([160])",
        "[WARNING] NOT LOADED diffusion_model.blocks.0.self_attn.norm_q.bias",
    ],
)
def test_every_lora_problem_comfyui_logs_is_seen(line: str) -> None:
    watch = LoraLogWatch()
    watch.started()
    watch("[INFO] Requested to load WAN21")
    watch("[ERROR] ERROR: VAE is invalid: None")  # not a LoRA's
    watch(line)
    assert watch.lines == [line]


def test_unloaded_tensors_of_the_services_own_loras_are_not_the_callers() -> None:
    """The built-in 4-step LoRAs share the prompt: a `lora key not loaded` line naming a
    tensor that is not in the job's LoRAs does not fail the job; one naming theirs does."""
    watch = LoraLogWatch(frozenset({"diffusion_model.blocks.0.ffn.0.lora_up.weight"}))
    watch.started()
    watch("[WARNING] lora key not loaded: diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight")
    assert watch.lines == []
    watch("[WARNING] lora key not loaded: diffusion_model.blocks.0.ffn.0.lora_up.weight")
    watch(SHAPE_ERROR)  # a weight's name: whose patch failed is not said, so it counts
    assert watch.count == 2


def test_the_supervisor_passes_comfyuis_lines_to_a_listener(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "print('lora key not loaded: x.alpha', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    spec = LaunchSpec(argv=(sys.executable, "-c", code), port=free_port())

    async def main() -> list[str]:
        supervisor = ComfySupervisor(spec, start_timeout_s=60)
        heard: list[str] = []
        stop = supervisor.listen(heard.append)
        await supervisor.start()
        try:
            for _ in range(1000):  # until the line comes (no time limit is the point)
                if heard:
                    break
                await asyncio.sleep(0.01)
        finally:
            stop()
            await supervisor.stop()
        return heard

    assert asyncio.run(main()) == ["lora key not loaded: x.alpha"]


# --- the same decisions as the real ComfyUI -------------------------------------------------

COMFY_SCRIPT = """
import json, logging, sys
sys.argv = ["lora_fit", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.lora, comfy.lora_convert, comfy.sd, comfy.utils

class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

lines = Lines()
logging.getLogger().addHandler(lines)
model_path, loras = json.loads(sys.stdin.read())
model = comfy.sd.load_diffusion_model(model_path)
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
weights = model.model.state_dict()
out = {}
for name, path in loras.items():
    lines.lines.clear()
    lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(path, safe_load=True))
    patches = comfy.lora.load_lora(lora, key_map)
    unmatched = [l.split(": ", 1)[1] for l in lines.lines if l.startswith("lora key not loaded: ")]
    patcher = model.clone()
    applied = set(patcher.add_patches(patches, 1.0))
    failed = sorted(k for k in patches if k not in applied)
    for key in sorted(applied):
        lines.lines.clear()
        comfy.lora.calculate_weight(patcher.patches[key], weights[key].float().clone(), key)
        if any(l.startswith(("ERROR ", "WARNING SHAPE MISMATCH")) for l in lines.lines):
            failed.append(key)
    out[name] = {"unmatched": sorted(unmatched), "failed": sorted(failed)}
print(json.dumps(out))
"""


@machine.needs_real_comfyui
def test_the_same_verdicts_as_the_real_comfyuis_load_lora(model_file: Path, tmp_path: Path) -> None:
    cases = FITTING | MISFITS
    paths = {name: str(lora_file(tmp_path / f"{name}.safetensors", t)) for name, t in cases.items()}
    python = os.environ.get("COMFYUI_TEST_PYTHON") or sys.executable
    result = subprocess.run(
        [python, "-c", COMFY_SCRIPT],
        input=json.dumps([str(model_file), paths]),
        cwd=machine.COMFYUI_TEST_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    real = json.loads(result.stdout.strip().splitlines()[-1])
    model = model_weights(model_file)
    for name, path in paths.items():
        ours = match(read_shapes(Path(path)), model)
        failed = sorted({str(m.details["model_key"]) for m in ours.wrong})
        if name == "diff_b_without_bias":  # ComfyUI drops that patch: "NOT LOADED <key>"
            assert (
                real[name]["failed"] == failed == ["diffusion_model.blocks.0.self_attn.norm_q.bias"]
            )
        loha_shapes_unchecked = name.startswith("loha")
        assert sorted(ours.unmatched) == real[name]["unmatched"], name
        assert failed == real[name]["failed"] or loha_shapes_unchecked, name
