"""Variants and Lightning: names, defaults per loaded weights, the Lightning scheduler,
a LoRA really fused, and which files the full profile picks (tiny pipeline, on CPU)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub import

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model_service.errors import InvalidInput, SetupFailed
from model_service.predictor import WorkerConfig, predict_now
from model_service.settings import Settings
from qwen_image_edit import manifest, pipeline_loader
from qwen_image_edit.manifest import ModelChoice, parse_model_variant
from qwen_image_edit.pipeline_loader import LoadedPipeline, fuse_lora, load_pipeline
from qwen_image_edit.predictor import QwenImageEditPredictor
from qwen_image_edit.schema import QwenEditInput
from qwen_image_edit.service import SPEC
from qwen_image_edit.tiny_model import ensure_tiny_pipeline


class Context:
    job_id = "job-lightning"

    def __init__(self, output_dir: Path, seed: int = 3) -> None:
        self.output_dir, self.seed = output_dir, seed

    def progress(self, step: int, total: int) -> None:
        pass

    def check_canceled(self) -> None:
        pass


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_pipeline(root)
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("in") / "in.png"
    Image.new("RGB", (80, 64), (30, 120, 200)).save(path)
    return str(path)


def tiny_config(models_dir: Path, variant: str | None = None) -> WorkerConfig:
    options = {} if variant is None else {"model_variant": variant}
    return WorkerConfig(profile="tiny", models_dir=models_dir, data_dir=models_dir, options=options)


def job(image: str, **overrides: Any) -> dict[str, Any]:
    values = QwenEditInput(image=image, prompt="make the sky blue", width=64, height=64)
    return values.model_dump() | overrides


def write_lora(
    path: Path, transformer: Any, layers: list[str], *, rank: int = 2, alpha: float = 1.0
) -> dict[str, torch.Tensor]:
    """A LoRA in lightx2v's layout (lora_down/lora_up/alpha) for `layers` of `transformer`."""
    generator = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for name in layers:
        layer = transformer.get_submodule(name)
        tensors[f"{name}.lora_down.weight"] = torch.randn(
            (rank, layer.in_features), generator=generator
        )
        tensors[f"{name}.lora_up.weight"] = torch.randn(
            (layer.out_features, rank), generator=generator
        )
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return tensors


def render(loaded: LoadedPipeline, image: str, seed: int = 3) -> np.ndarray:
    with Image.open(image) as picture:
        outputs = loaded(
            image=[picture.convert("RGB")],
            prompt="make the sky blue",
            num_inference_steps=2,
            true_cfg_scale=1.0,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(seed),
        )
    return np.asarray(outputs[0])


# --- names and defaults (no torch needed) ------------------------------------------


@pytest.mark.parametrize(
    ("name", "repo", "pipeline_class", "steps", "cfg"),
    [
        # base models: QwenLM/Qwen-Image README quick starts (true_cfg_scale 4.0)
        ("edit", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 50, 4.0),
        ("edit-2509", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", 40, 4.0),
        ("edit-2511", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 40, 4.0),
        # Lightning: its own step count at cfg 1 (ModelTC/Qwen-Image-Lightning README)
        ("edit-lightning-4", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 4, 1.0),
        ("edit-lightning-8", "Qwen/Qwen-Image-Edit", "QwenImageEditPipeline", 8, 1.0),
        ("edit-2509-lightning-4", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", 4, 1.0),
        ("edit-2509-lightning-8", "Qwen/Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline", 8, 1.0),
        ("edit-2511-lightning-4", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 4, 1.0),
        ("edit-2511-lightning-8", "Qwen/Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", 8, 1.0),
    ],
)
def test_each_model_variant_and_its_defaults(
    name: str, repo: str, pipeline_class: str, steps: int, cfg: float
) -> None:
    choice = parse_model_variant(name)
    assert choice.name == name
    assert (choice.variant.hf_repo, choice.variant.pipeline_class) == (repo, pipeline_class)
    assert (choice.default_steps, choice.default_true_cfg_scale) == (steps, cfg)


def test_the_default_is_edit_2509_without_lightning() -> None:
    assert parse_model_variant(None) == ModelChoice(manifest.EDIT_2509, None)
    assert manifest.DEFAULT_VARIANT == "edit-2509"


@pytest.mark.parametrize(
    "name", ["edit-2512", "edit-2509-lightning-6", "edit-2509-lightning-", "lightning-4", "Edit"]
)
def test_unknown_model_variants_name_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match="edit-2511") as caught:
        parse_model_variant(name)
    assert "-lightning-4" in str(caught.value)


def test_lightning_files() -> None:
    # nunchaku examples/v1/qwen-image-edit-lightning.py, qwen-image-edit-2509-lightning.py
    assert manifest.EDIT.nunchaku_hf_path("int4", 32, lightning_steps=8) == (
        "nunchaku-tech/nunchaku-qwen-image-edit/"
        "svdq-int4_r32-qwen-image-edit-lightningv1.0-8steps.safetensors"
    )
    assert manifest.EDIT_2509.nunchaku_hf_path("fp4", lightning_steps=4) == (
        "nunchaku-tech/nunchaku-qwen-image-edit-2509/lightning-251115/"
        "svdq-fp4_r128-qwen-image-edit-2509-lightning-4steps-251115.safetensors"
    )
    # lightx2v's bf16 LoRAs (ModelTC/Qwen-Image-Lightning README; lightx2v 2511 repo)
    lora = {
        n: parse_model_variant(n).lightning_lora_file for n in ("edit", "edit-2509-lightning-8")
    }
    assert lora == {
        "edit": None,
        "edit-2509-lightning-8": (
            "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors"
        ),
    }
    assert manifest.EDIT.lightning_lora_files[4] == (
        "Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors"
    )
    assert manifest.EDIT_2511.lightning_lora_repo == "lightx2v/Qwen-Image-Edit-2511-Lightning"
    assert manifest.EDIT_2511.lightning_lora_files[4] == (
        "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"
    )


def test_2511_has_no_nunchaku_files() -> None:
    assert not manifest.EDIT_2511.has_nunchaku()
    assert not manifest.EDIT_2511.has_nunchaku(4)
    with pytest.raises(ValueError, match="no Nunchaku transformer for edit-2511"):
        manifest.EDIT_2511.nunchaku_filename("int4")
    assert manifest.EDIT_2509.has_nunchaku()
    assert manifest.EDIT_2509.has_nunchaku(8)


def test_lightning_scheduler_config_is_the_distillation_one() -> None:
    """ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: shift 3, exponential."""
    config = manifest.LIGHTNING_SCHEDULER_CONFIG
    assert config["base_shift"] == config["max_shift"] == pytest.approx(math.log(3))
    assert (config["time_shift_type"], config["shift_terminal"]) == ("exponential", None)
    assert (config["use_dynamic_shifting"], config["shift"]) == (True, 1.0)


def test_the_service_passes_the_whole_name_and_checks_images_per_model() -> None:
    options = SPEC.worker_options(Settings(model_variant="edit-2511-lightning-4"))
    assert options["model_variant"] == "edit-2511-lightning-4"
    assert SPEC.worker_options(Settings())["model_variant"] == "edit-2509"
    two = QwenEditInput(images=["upl_a", "upl_b"], prompt="x")
    SPEC.check_input(two, Settings(model_variant="edit-2511-lightning-8"))
    with pytest.raises(InvalidInput, match="takes 1 image"):
        SPEC.check_input(two, Settings(model_variant="edit-lightning-4"))


# --- the tiny pipeline ---------------------------------------------------------------


def test_edit_2511_loads_the_plus_pipeline(models_dir: Path, image: str, tmp_path: Path) -> None:
    predictor = QwenImageEditPredictor()
    info = predictor.setup(tiny_config(models_dir, "edit-2511")).info
    assert (info["variant"], info["model"]) == ("edit-2511", "Qwen/Qwen-Image-Edit-2511")
    assert info["pipeline_class"] == "QwenImageEditPlusPipeline"
    assert (info["lightning"], info["scheduler"]) == (None, pipeline_loader.SCHEDULER_BASE)
    assert (info["default_steps"], info["default_true_cfg_scale"]) == (2, 4.0)  # tiny: 2 steps
    result = predict_now(predictor, job(image), Context(tmp_path))
    assert (result.info["steps"], result.info["true_cfg_scale"]) == (2, 4.0)


def test_lightning_defaults_scheduler_and_sigmas(
    models_dir: Path, image: str, tmp_path: Path
) -> None:
    predictor = QwenImageEditPredictor()
    info = predictor.setup(tiny_config(models_dir, "edit-2509-lightning-4")).info
    assert info["variant"] == "edit-2509-lightning-4"
    assert (info["default_steps"], info["default_true_cfg_scale"]) == (4, 1.0)
    assert info["lightning"] == "4-step random-weight LoRA, fused"
    assert info["scheduler"] == pipeline_loader.SCHEDULER_LIGHTNING
    assert info["weights"][-1].endswith("qwen-image-edit-lightning-4steps-lora.safetensors")
    loaded = predictor._loaded
    assert loaded is not None
    config = loaded.pipe.scheduler.config
    assert config["base_shift"] == config["max_shift"] == pytest.approx(math.log(3))
    assert config["shift_terminal"] is None

    sigmas: list[float] = []
    hook = loaded.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sigmas.append(float(kwargs["timestep"][0])),
        with_kwargs=True,
    )
    try:
        result = predict_now(predictor, job(image), Context(tmp_path))
    finally:
        hook.remove()
    assert (result.info["steps"], result.info["true_cfg_scale"]) == (4, 1.0)
    # shift 3 on linspace(1, 1/4, 4): 3s / (1 + 2s); one model call per step at cfg 1
    assert sigmas == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-5)


def test_the_base_scheduler_gives_other_sigmas(
    models_dir: Path, image: str, tmp_path: Path
) -> None:
    predictor = QwenImageEditPredictor()
    predictor.setup(tiny_config(models_dir, "edit-2509"))
    loaded = predictor._loaded
    assert loaded is not None
    sigmas: list[float] = []
    hook = loaded.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sigmas.append(float(kwargs["timestep"][0])),
        with_kwargs=True,
    )
    try:
        predict_now(predictor, job(image, steps=4, true_cfg_scale=1.0), Context(tmp_path))
    finally:
        hook.remove()
    assert len(sigmas) == 4
    assert sigmas != pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-3)


def test_a_lora_is_loaded_and_fused(models_dir: Path, image: str, tmp_path: Path) -> None:
    base = load_pipeline(tiny_config(models_dir), parse_model_variant("edit-2509"))
    fused = load_pipeline(tiny_config(models_dir), parse_model_variant("edit-2509"))
    transformer = fused.pipe.transformer
    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"]
    before = {name: transformer.get_submodule(name).weight.detach().clone() for name in layers}
    lora = write_lora(tmp_path / "lora.safetensors", transformer, layers, rank=2, alpha=1.0)

    fuse_lora(fused.pipe, tmp_path / "lora.safetensors")

    for name in layers:  # W + (alpha / rank) * up @ down
        delta = 0.5 * lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]
        torch.testing.assert_close(transformer.get_submodule(name).weight, before[name] + delta)
    assert not [name for name, _ in transformer.named_modules() if "lora" in name]
    assert np.array_equal(render(base, image), render(base, image))
    assert not np.array_equal(render(base, image), render(fused, image))


def test_a_lora_for_another_model_is_refused(models_dir: Path, tmp_path: Path) -> None:
    loaded = load_pipeline(tiny_config(models_dir), parse_model_variant("edit"))
    transformer = loaded.pipe.transformer
    wrong = tmp_path / "wrong.safetensors"
    tensors = write_lora(wrong, transformer, ["transformer_blocks.0.attn.to_q"])
    tensors["transformer_blocks.0.attn.to_q.lora_down.weight"] = torch.zeros(2, 3072)
    save_file(tensors, str(wrong))
    with pytest.raises(SetupFailed, match=r"transformer_blocks\.0\.attn\.to_q is \(48, 3072\)"):
        fuse_lora(loaded.pipe, wrong)
    missing = tmp_path / "missing.safetensors"
    tensors = write_lora(missing, transformer, ["transformer_blocks.0.attn.to_q"])
    save_file({k.replace("blocks.0", "blocks.9"): v for k, v in tensors.items()}, str(missing))
    with pytest.raises(SetupFailed, match=r"blocks\.9\.attn\.to_q .* no such layer"):
        fuse_lora(loaded.pipe, missing)


# --- the full profile's choices, on a simulated GPU ----------------------------------


class FullProfile:
    """`_load_full` with the GPU, the Nunchaku check and the loading simulated: the tiny
    pipeline stands in for the real one; what the loader asked for is recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, models_dir: Path, kind: str) -> None:
        self.tiny = models_dir
        self.loaded_with: list[Path | None] = []
        self.offload: list[str] = []
        reason = "Nunchaku int4 on Simulated RTX 4090 (compute capability 8.9)"
        if kind == pipeline_loader.BF16:
            reason = "Nunchaku does not support compute capability 9.0 (Hopper); using bf16"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80e9, 80e9))
        monkeypatch.setattr(pipeline_loader, "_choose_transformer", lambda: (kind, reason))
        monkeypatch.setattr(pipeline_loader, "_from_pretrained_full", self._from_pretrained)
        monkeypatch.setattr(pipeline_loader, "_apply_offload", lambda p, o: self.offload.append(o))

    def _from_pretrained(self, variant: Any, folder: Path, nunchaku_file: Path | None) -> Any:
        self.loaded_with.append(nunchaku_file)
        tiny = load_pipeline(tiny_config(self.tiny), ModelChoice(variant))
        return tiny.pipe


def base_folder(root: Path, variant: manifest.ModelVariant, *, transformer: bool) -> None:
    folder = root / variant.local_dirname
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    if transformer:
        (folder / "transformer").mkdir()
        (folder / "transformer" / "config.json").write_text("{}")


def full_config(root: Path) -> WorkerConfig:
    return WorkerConfig(profile="full", models_dir=root, data_dir=root)


def test_2511_on_a_nunchaku_gpu_runs_bf16_and_says_why(
    monkeypatch: pytest.MonkeyPatch, models_dir: Path, tmp_path: Path
) -> None:
    simulated = FullProfile(monkeypatch, models_dir, pipeline_loader.NUNCHAKU_INT4)
    base_folder(tmp_path, manifest.EDIT_2511, transformer=True)
    loaded = load_pipeline(full_config(tmp_path), parse_model_variant("edit-2511"))
    assert (loaded.transformer_kind, simulated.loaded_with) == ("bf16", [None])
    assert "no official Nunchaku quantisation of Qwen/Qwen-Image-Edit-2511" in loaded.reason
    assert loaded.weights == [str(tmp_path / "Qwen-Image-Edit-2511" / "transformer")]
    assert (loaded.default_steps, loaded.default_true_cfg_scale) == (40, 4.0)


def test_bf16_lightning_needs_the_lora_and_names_its_download(
    monkeypatch: pytest.MonkeyPatch, models_dir: Path, tmp_path: Path
) -> None:
    FullProfile(monkeypatch, models_dir, pipeline_loader.NUNCHAKU_INT4)
    base_folder(tmp_path, manifest.EDIT_2511, transformer=True)
    with pytest.raises(SetupFailed) as caught:
        load_pipeline(full_config(tmp_path), parse_model_variant("edit-2511-lightning-4"))
    assert (
        "hf download lightx2v/Qwen-Image-Edit-2511-Lightning "
        f"Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors --local-dir "
        f"{tmp_path / 'lightning'}"
    ) in caught.value.message


def test_bf16_lightning_fuses_the_lora_and_uses_its_scheduler(
    monkeypatch: pytest.MonkeyPatch, models_dir: Path, tmp_path: Path
) -> None:
    simulated = FullProfile(monkeypatch, models_dir, pipeline_loader.BF16)
    base_folder(tmp_path, manifest.EDIT_2509, transformer=True)
    lora = tmp_path / "lightning" / manifest.EDIT_2509.lightning_lora_files[8]
    lora.parent.mkdir(parents=True)
    tiny = load_pipeline(tiny_config(models_dir), parse_model_variant("edit-2509"))
    layer = "transformer_blocks.0.attn.to_k"
    before = tiny.pipe.transformer.get_submodule(layer).weight.detach().clone()
    write_lora(lora, tiny.pipe.transformer, [layer])

    loaded = load_pipeline(full_config(tmp_path), parse_model_variant("edit-2509-lightning-8"))

    assert simulated.loaded_with == [None]
    assert simulated.offload == ["none"]
    assert loaded.weights == [str(tmp_path / "Qwen-Image-Edit-2509" / "transformer"), str(lora)]
    assert loaded.lightning == (
        "8-step LoRA Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16"
        ".safetensors, fused"
    )
    assert loaded.pipe.scheduler.config["base_shift"] == pytest.approx(math.log(3))
    assert not torch.equal(loaded.pipe.transformer.get_submodule(layer).weight, before)
    assert (loaded.default_steps, loaded.default_true_cfg_scale) == (8, 1.0)


def test_nunchaku_lightning_loads_the_fused_file_without_a_lora(
    monkeypatch: pytest.MonkeyPatch, models_dir: Path, tmp_path: Path
) -> None:
    simulated = FullProfile(monkeypatch, models_dir, pipeline_loader.NUNCHAKU_INT4)
    base_folder(tmp_path, manifest.EDIT_2509, transformer=False)
    name = "lightning-251115/svdq-int4_r128-qwen-image-edit-2509-lightning-4steps-251115"
    fused = tmp_path / "nunchaku" / f"{name}.safetensors"
    fused.parent.mkdir(parents=True)
    fused.write_bytes(b"")

    loaded = load_pipeline(full_config(tmp_path), parse_model_variant("edit-2509-lightning-4"))

    assert (loaded.transformer_kind, simulated.loaded_with) == ("nunchaku-int4", [fused])
    assert loaded.weights == [str(fused)]
    assert loaded.lightning == "4-step Nunchaku transformer (Lightning fused by Nunchaku)"
    assert loaded.scheduler == pipeline_loader.SCHEDULER_LIGHTNING
    assert loaded.pipe.scheduler.config["time_shift_type"] == "exponential"


def test_a_missing_nunchaku_lightning_file_is_named(
    monkeypatch: pytest.MonkeyPatch, models_dir: Path, tmp_path: Path
) -> None:
    FullProfile(monkeypatch, models_dir, pipeline_loader.NUNCHAKU_INT4)
    base_folder(tmp_path, manifest.EDIT_2509, transformer=False)
    with pytest.raises(SetupFailed) as caught:
        load_pipeline(full_config(tmp_path), parse_model_variant("edit-2509-lightning-8"))
    assert (
        "hf download nunchaku-tech/nunchaku-qwen-image-edit-2509 lightning-251115/"
        "svdq-int4_r128-qwen-image-edit-2509-lightning-8steps-251115.safetensors "
        f"--local-dir {tmp_path / 'nunchaku'}"
    ) in caught.value.message
