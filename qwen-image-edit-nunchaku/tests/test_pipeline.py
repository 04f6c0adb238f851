"""The worker side on a real diffusers pipeline: a tiny random-weight model built here.

Runs `QwenImageEditPredictor` in-process on CPU (no HTTP, no worker process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub import

import numpy as np
import pytest
import torch
from PIL import Image
from structlog.testing import capture_logs

from model_service.errors import InvalidInput, JobCanceled, SetupFailed
from model_service.predictor import WorkerConfig, predict_now
from qwen_image_edit import hires, manifest, pipeline_loader, references, tiny_model
from qwen_image_edit.pipeline_loader import (
    choose_offload,
    load_pipeline,
    offload_reason,
    resolve_offload,
)
from qwen_image_edit.predictor import DECODED_IMAGES, QwenImageEditPredictor
from qwen_image_edit.tiny_model import MARKER_FILE, MARKER_KEY, TINY_SUBDIR, ensure_tiny_pipeline


class FakeContext:
    """A JobContext that records progress; cancels at `cancel_at` when given."""

    job_id = "job-test"

    def __init__(self, output_dir: Path, seed: int = 7, cancel_at: int | None = None) -> None:
        self.output_dir = output_dir
        self.seed = seed
        self.cancel_at = cancel_at
        self.calls: list[tuple[int, int]] = []

    def progress(self, step: int, total: int) -> None:
        self.calls.append((step, total))
        if self.cancel_at is not None and step >= self.cancel_at:
            raise JobCanceled(self.job_id)

    def check_canceled(self) -> None:
        pass


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_pipeline(root)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for i, (size, color) in enumerate([((96, 80), (200, 30, 40)), ((48, 112), (20, 220, 90))]):
        Image.new("RGB", size, color).save(folder / f"in{i}.png")
        paths.append(str(folder / f"in{i}.png"))
    return paths


def _predictor(models_dir: Path, variant: str) -> QwenImageEditPredictor:
    predictor = QwenImageEditPredictor()
    config = WorkerConfig(
        profile="tiny", models_dir=models_dir, data_dir=models_dir,
        options={"model_variant": variant},
    )  # fmt: skip
    predictor.setup(config)
    return predictor


@pytest.fixture(scope="module")
def edit(models_dir: Path) -> QwenImageEditPredictor:
    return _predictor(models_dir, "edit")


@pytest.fixture(scope="module")
def plus(models_dir: Path) -> QwenImageEditPredictor:
    return _predictor(models_dir, "edit-2509")


def _inputs(paths: list[str], **overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "image": None, "images": paths, "prompt": "make the sky blue", "negative_prompt": " ",
        "steps": None, "true_cfg_scale": None, "seed": None, "num_images": 1,
        "width": 64, "height": 48, "output_format": "png",
    }  # fmt: skip
    return inputs | overrides


def test_tiny_folder_is_marked(models_dir: Path) -> None:
    folder = models_dir / TINY_SUBDIR
    assert (folder / MARKER_FILE).is_file()
    assert json.loads((folder / "model_index.json").read_text())[MARKER_KEY] is True
    assert (folder / "processor" / "preprocessor_config.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".building")]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: Path, variant: str) -> None:
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(tiny_model, "_mark", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        ensure_tiny_pipeline(tmp_path)
    assert list((tmp_path / TINY_SUBDIR).parent.iterdir()) == []


def test_setup_defaults_to_edit_2509(models_dir: Path) -> None:
    config = WorkerConfig(profile="tiny", models_dir=models_dir, data_dir=models_dir)
    info = QwenImageEditPredictor().setup(config).info
    assert info["variant"] == manifest.DEFAULT_VARIANT == "edit-2509"
    assert info["pipeline_class"] == "QwenImageEditPlusPipeline"
    assert (info["transformer_kind"], info["device"], info["tiny"]) == ("float32-cpu", "cpu", True)


def test_edit_one_image(edit: QwenImageEditPredictor, images: list[str], tmp_path: Path) -> None:
    ctx = FakeContext(tmp_path)
    result = predict_now(edit, _inputs(images[:1], num_images=2), ctx)
    assert result.outputs == ["output_0.png", "output_1.png"]
    assert result.info == {"width": 64, "height": 48, "steps": 2, "true_cfg_scale": 4.0}
    assert ctx.calls == [(1, 2), (2, 2)]
    for name in result.outputs:
        with Image.open(tmp_path / name) as image:
            assert (image.format, image.size) == ("PNG", (64, 48))


def test_edit_2509_two_images(
    plus: QwenImageEditPredictor, images: list[str], tmp_path: Path
) -> None:
    ctx = FakeContext(tmp_path)
    result = predict_now(plus, _inputs(images, width=80, height=64, output_format="jpeg"), ctx)
    assert result.outputs == ["output_0.jpg"]
    assert ctx.calls == [(1, 2), (2, 2)]
    with Image.open(tmp_path / "output_0.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (80, 64))


def test_webp_output(edit: QwenImageEditPredictor, images: list[str], tmp_path: Path) -> None:
    result = predict_now(edit, _inputs(images[:1], output_format="webp"), FakeContext(tmp_path))
    with Image.open(tmp_path / result.outputs[0]) as image:
        assert (result.outputs[0], image.format, image.size) == ("output_0.webp", "WEBP", (64, 48))


def test_prepare_decodes_and_finish_writes(
    edit: QwenImageEditPredictor, images: list[str], tmp_path: Path
) -> None:
    prepared = edit.prepare(_inputs(images[:1]))
    assert [image.size for image in prepared[DECODED_IMAGES]] == [(96, 80)]
    result = edit.predict(prepared, FakeContext(tmp_path))
    assert (result.outputs, result.info["width"]) == (["output_0.png"], 64)
    assert not list(tmp_path.iterdir()), "predict writes nothing: finish does"
    assert result.finish is not None
    result.finish()
    with Image.open(tmp_path / "output_0.png") as image:
        assert image.size == (64, 48)


def test_same_seed_same_bytes(
    plus: QwenImageEditPredictor, images: list[str], tmp_path: Path
) -> None:
    def run(name: str, seed: int) -> bytes:
        predict_now(plus, _inputs(images), FakeContext(tmp_path / name, seed=seed))
        return (tmp_path / name / "output_0.png").read_bytes()

    first = run("a", 5)
    assert run("b", 5) == first
    assert run("c", 6) != first


def test_cancel_stops_the_run(
    edit: QwenImageEditPredictor, images: list[str], tmp_path: Path
) -> None:
    ctx = FakeContext(tmp_path, cancel_at=1)
    with pytest.raises(JobCanceled):
        predict_now(edit, _inputs(images[:1], steps=5), ctx)
    assert ctx.calls == [(1, 5)]
    assert not list(tmp_path.iterdir())


def test_edit_refuses_two_images(
    edit: QwenImageEditPredictor, images: list[str], tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="at most 1"):
        predict_now(edit, _inputs(images), FakeContext(tmp_path))


def test_tiny_patch_is_scoped(edit: QwenImageEditPredictor) -> None:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    with pipeline_loader.tiny_conditioning():
        patched: Any = module.calculate_dimensions
        assert patched(1024 * 1024, 1.0)[:2] == (128, 128)
        assert patched(1024 * 1024, 1000.0)[1] == 32  # never 0
    assert module.calculate_dimensions is original


@pytest.mark.parametrize(
    ("kind", "free_gb", "mode"),
    [
        ("bf16", 79.0, "none"),
        ("bf16", 62.0, "none"),
        ("bf16", 40.0, "model-cpu-offload"),
        ("bf16", 24.0, "model-cpu-offload"),
        ("bf16", 23.9, "sequential-cpu-offload"),
        ("nunchaku-int4", 46.0, "none"),
        ("nunchaku-fp4", 30.0, "model-cpu-offload"),
        ("nunchaku-int4", 18.5, "model-cpu-offload"),
        ("nunchaku-int4", 18.0, "nunchaku-blocks+sequential"),
        ("float32-cpu", 0.0, "none"),
    ],
)
def test_choose_offload(kind: str, free_gb: float, mode: str) -> None:
    assert choose_offload(kind, free_gb) == mode


@pytest.mark.parametrize(
    ("kind", "free_gb", "requested", "mode"),
    [
        ("bf16", 79.0, "auto", "none"),
        ("bf16", 40.0, "auto", "model-cpu-offload"),
        ("nunchaku-int4", 18.0, "auto", "nunchaku-blocks+sequential"),
        ("bf16", 10.0, "none", "none"),  # the operator may overrule the free VRAM
        ("bf16", 79.0, "model", "model-cpu-offload"),
        ("bf16", 79.0, "sequential", "sequential-cpu-offload"),
        ("nunchaku-int4", 10.0, "none", "none"),
        ("nunchaku-fp4", 79.0, "model", "model-cpu-offload"),
        ("nunchaku-int4", 79.0, "sequential", "nunchaku-blocks+sequential"),
        ("nunchaku-fp4", 79.0, "sequential", "nunchaku-blocks+sequential"),
        ("float32-cpu", 0.0, "model", "none"),  # the CPU profile is never offloaded
        ("float32-cpu", 0.0, "sequential", "none"),
    ],
)
def test_resolve_offload(kind: str, free_gb: float, requested: str, mode: str) -> None:
    assert resolve_offload(kind, free_gb, requested) == mode


@pytest.mark.parametrize(("kind", "requested"), [("bf16", "bogus"), ("fp8", "model")])
def test_resolve_offload_refuses_unknown_values(kind: str, requested: str) -> None:
    with pytest.raises(ValueError, match="bogus|fp8"):
        resolve_offload(kind, 79.0, requested)


def test_offload_reason_says_chosen_or_set() -> None:
    assert offload_reason(79.12, "auto", "none") == "; 79.1 GB VRAM free -> none"
    assert (
        offload_reason(79.12, "model", "model-cpu-offload")
        == "; CPU_OFFLOAD=model -> model-cpu-offload (79.1 GB VRAM free)"
    )


def test_full_profile_names_the_missing_folder(tmp_path: Path) -> None:
    config = WorkerConfig(profile="full", models_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(SetupFailed) as caught:
        load_pipeline(config, manifest.ModelChoice(manifest.EDIT_2509))
    missing = tmp_path / "Qwen-Image-Edit-2509" / "model_index.json"
    assert str(missing) in caught.value.message
    assert "Qwen/Qwen-Image-Edit-2509" in caught.value.message


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "compute capability 9.0 (Hopper)"), ((8, 9), "`import nunchaku` failed")],
)
def test_bf16_fallback_is_logged_loudly(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: str
) -> None:
    # Simulated GPU; on 8.9 Nunchaku would run, but it is not installed here.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Simulated GPU")
    with capture_logs() as logs:
        kind, reason = pipeline_loader._choose_transformer()
    assert kind == "bf16"
    assert expected in reason
    assert [(e["log_level"], e["reason"]) for e in logs] == [("warning", reason)]


def test_full_profile_names_the_missing_transformer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "Qwen-Image-Edit"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    config = WorkerConfig(profile="full", models_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(SetupFailed, match="transformer/config.json"):
        load_pipeline(config, manifest.ModelChoice(manifest.EDIT))


def test_manifest_files() -> None:
    assert manifest.EDIT.nunchaku_hf_path("int4") == (
        "nunchaku-tech/nunchaku-qwen-image-edit/svdq-int4_r128-qwen-image-edit.safetensors"
    )
    assert manifest.EDIT_2509.nunchaku_filename("fp4", 32) == (
        "svdq-fp4_r32-qwen-image-edit-2509.safetensors"
    )
    assert (9, 0) not in manifest.NUNCHAKU_COMPUTE_CAPABILITIES
    assert (10, 0) not in manifest.NUNCHAKU_COMPUTE_CAPABILITIES


@pytest.fixture(autouse=True)
def _no_leaked_patch() -> Iterator[None]:
    yield
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module

    assert plus_module.calculate_dimensions.__name__ == "calculate_dimensions"
    assert plus_module.calculate_dimensions.__module__ == plus_module.__name__


def _noise_png(path: Path, size: tuple[int, int], seed: int) -> str:
    pixels = torch.randint(
        0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed)
    )
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)
    return str(path)


@pytest.mark.parametrize("size", [None, (64, 48)], ids=["input-size", "width-height"])
def test_inpaint_keeps_every_pixel_beyond_the_feather(
    plus: QwenImageEditPredictor, tmp_path: Path, size: tuple[int, int] | None
) -> None:
    """The model gets the green composite; the PNG it writes is the input's, byte for
    byte, farther than `mask_feather` px from the mask, at the input's size."""
    image = _noise_png(tmp_path / "in.png", (72, 40), seed=3)
    mask = Image.new("L", (36, 20), 0)  # half the size: scaled to the image
    mask.paste(255, (10, 5, 20, 12))
    mask.save(tmp_path / "mask.png")
    width, height = size or (None, None)
    inputs = _inputs([image], mask=str(tmp_path / "mask.png"), mask_feather=6)
    inputs |= {"width": width, "height": height, "num_images": 2}
    prepared = plus.prepare(inputs)
    model_sees = np.asarray(prepared[DECODED_IMAGES][0])
    assert (model_sees[10:24, 20:40] == [0, 255, 0]).all()
    out = tmp_path / "out"
    result = plus.predict(prepared, FakeContext(out))
    assert result.finish is not None
    result.finish()
    assert result.info["inpaint"] == {"mask_feather": 6}
    expected_size = size or (72, 40)
    assert (result.info["width"], result.info["height"]) == expected_size
    with Image.open(image) as original:
        original_pixels = np.asarray(original.convert("RGB"))
    far = np.ones((40, 72), dtype=bool)
    far[10 - 6 : 24 + 6, 20 - 6 : 40 + 6] = False  # the mask (scaled x2) and its feather
    for name in result.outputs:
        with Image.open(out / name) as written:
            assert written.size == expected_size
            pixels = np.asarray(written.convert("RGB"))
        if size is None:
            assert (pixels[far] == original_pixels[far]).all()
        assert (pixels[12:22, 22:38] != original_pixels[12:22, 22:38]).any()


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("variant", ["plus", "edit"])
def test_hires_runs_a_second_pass_at_the_larger_size(
    variant: str, images: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """hires_scale 2: 64x48, then 128x96 from it; progress counts both passes; the pass
    begins where the scheduler's own shifted schedule says (`start_sigma`). On Edit-2509
    (QwenImageEditPlusPipeline) and the first Edit (QwenImageEditPipeline)."""
    plus: QwenImageEditPredictor = request.getfixturevalue(variant)
    ctx = FakeContext(tmp_path)
    inputs = _inputs(images[:1], hires_scale=2.0, num_images=2, seed=None)
    result = predict_now(plus, inputs, ctx)
    assert result.info["hires"] == {"scale": 2.0, "steps": 6, "denoise": 0.5}
    assert (result.info["width"], result.info["height"]) == (128, 96)
    assert ctx.calls == [(step, 8) for step in range(1, 9)]
    for name in result.outputs:
        with Image.open(tmp_path / name) as image:
            assert image.size == (128, 96)
    second = hires.Hires(2.0)
    assert second.schedule() == pytest.approx(list(np.linspace(1.0, 1 / 12, 12)[6:]))
    pipe = plus._require_loaded().pipe
    assert float(pipe.scheduler.sigmas[0]) == pytest.approx(
        second.start_sigma(pipe.scheduler, (128 // 16) * (96 // 16), torch.device("cpu"))
    )


def test_hires_starts_from_the_first_pass_upscaled_and_noised(
    plus: QwenImageEditPredictor, images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second pass's latents are the first pass's images, scaled up (bicubic) and
    encoded, plus unit Gaussian noise at the schedule's first sigma (denoise 0.1: a low
    one, and the latents follow the picture). (Pixels cannot show it: the
    tiny random VAE's decoder is no inverse of its encoder.)"""
    calls: list[tuple[dict[str, Any], list[Image.Image]]] = []
    original = pipeline_loader.LoadedPipeline.__call__

    def recording(self: pipeline_loader.LoadedPipeline, **kwargs: Any) -> list[Any]:
        outputs = original(self, **kwargs)
        calls.append((kwargs, outputs))
        return outputs

    monkeypatch.setattr(pipeline_loader.LoadedPipeline, "__call__", recording)
    inputs = _inputs(images[:1], seed=11, hires_scale=2.0, hires_denoise=0.1)
    predict_now(plus, inputs, FakeContext(tmp_path))
    (_, first_images), (second_kwargs, _) = calls
    pipe = plus._require_loaded().pipe
    sigma = float(pipe.scheduler.sigmas[0])  # where the pipeline began the second pass
    assert 0.0 < sigma < 0.5
    upscaled = first_images[0].resize((128, 96), Image.Resampling.BICUBIC)
    pixels = pipe.image_processor.preprocess(upscaled, 96, 128).unsqueeze(2)
    with torch.no_grad():
        clean = pipe._encode_vae_image(pixels, torch.Generator().manual_seed(0))
    clean = pipe._pack_latents(clean, 1, clean.shape[1], clean.shape[3], clean.shape[4])
    latents = second_kwargs["latents"]
    assert latents.shape == clean.shape
    noise = (latents - (1 - sigma) * clean) / sigma
    assert abs(float(noise.mean())) < 0.1
    assert 0.9 < float(noise.std()) < 1.1
    correlation = torch.corrcoef(torch.stack([latents.flatten(), clean.flatten()]))[0, 1]
    assert float(correlation) > 0.5  # pure noise: about 0


@pytest.mark.parametrize(
    ("scale", "size", "expected"),
    [(2.0, (64, 48), (128, 96)), (1.5, (1024, 768), (1536, 1152)), (1.3, (100, 60), (128, 80))],
)
def test_hires_size_is_scaled_in_multiples_of_16(
    scale: float, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert hires.Hires(scale).size(*size) == expected


def test_references_follow_the_inputs_scaled_and_named_in_the_prompt(
    plus: QwenImageEditPredictor, images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A style reference at strength 0.5: the pipeline gets the input image, then the
    reference with half its contrast; the prompt ends with the style sentence naming
    Picture 2; the job's info says what was used."""
    calls: list[dict[str, Any]] = []
    original = pipeline_loader.LoadedPipeline.__call__

    def recording(self: pipeline_loader.LoadedPipeline, **kwargs: Any) -> list[Any]:
        calls.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(pipeline_loader.LoadedPipeline, "__call__", recording)
    inputs = _inputs(images[:1], references=[images[1]], reference_roles=["style"])
    inputs["reference_strengths"] = [0.5]
    result = predict_now(plus, inputs, FakeContext(tmp_path))
    (kwargs,) = calls
    given = kwargs["image"]
    assert [image.size for image in given] == [(96, 80), (48, 112)]
    assert given[1].getpixel((0, 0)) == (round(128 + 0.5 * (20 - 128)), 174, 109)
    expected = "make the sky blue " + references.TEMPLATES["style"].format(n=2)
    assert kwargs["prompt"] == expected
    assert result.info["references"] == [{"role": "style", "strength": 0.5}]
    assert result.info["prompt"] == expected
    # without width/height: the input image's aspect (96x80), not the reference's (48x112)
    calls.clear()
    inputs |= {"width": None, "height": None}
    result = predict_now(plus, inputs, FakeContext(tmp_path / "default-size"))
    assert (calls[0]["width"], calls[0]["height"]) == (1120, 928)
    assert (result.info["width"], result.info["height"]) == (1120, 928)
