"""Per-job LoRAs (`input.loras`) on the tiny pipeline: fetched from a local HTTP server
into the LoRA cache once, applied with diffusers' adapters at their strengths, gone after
the job; refused on Nunchaku's 4-bit transformer; and over HTTP through the service."""

from __future__ import annotations

import base64
import copy
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub import

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from model_service.errors import InvalidInput, LoraInvalid, LoraUnavailable
from model_service.predictor import WorkerConfig, predict_now
from model_service_testing.hub_standin import Server
from model_service_testing.process import ServiceProcess
from qwen_image_edit import pipeline_loader
from qwen_image_edit.predictor import QwenImageEditPredictor
from qwen_image_edit.schema import QwenEditInput
from qwen_image_edit.service import SPEC
from qwen_image_edit.tiny_model import ensure_tiny_pipeline


class Context:
    job_id = "job-loras"

    def __init__(self, output_dir: Path, seed: int = 5) -> None:
        self.output_dir, self.seed = output_dir, seed

    def progress(self, step: int, total: int) -> None:
        pass

    def check_canceled(self) -> None:
        pass


def tiny_lora(
    transformer: Any, seed: int, *, prefix: str = "", targets: tuple[str, ...] = ()
) -> bytes:
    """A LoRA made by PEFT for the tiny transformer's own layers (`LoraConfig` on it,
    `get_peft_model_state_dict`), with random up and down weights (PEFT starts `lora_B`
    at zero: no effect), as safetensors; `prefix` "transformer." gives diffusers' layout."""
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=list(targets or ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj")),
    )
    model = copy.deepcopy(transformer)  # the service's own stays untouched
    model.add_adapter(config, adapter_name="made_here")
    state = get_peft_model_state_dict(model, adapter_name="made_here")
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        prefix + key: torch.randn(value.shape, generator=generator) * 0.5
        for key, value in state.items()
    }
    assert tensors
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    return save(tensors)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_pipeline(root)
    return root


@pytest.fixture(scope="module")
def predictor(models_dir: Path) -> Iterator[QwenImageEditPredictor]:
    predictor = QwenImageEditPredictor()
    options = {"model_variant": "edit-2509", "fetch_allow_networks": ["127.0.0.0/8"]}
    config = WorkerConfig(
        profile="tiny", models_dir=models_dir, data_dir=models_dir, options=options
    )
    info = predictor.setup(config).info
    assert info["job_loras"] is True
    yield predictor
    if predictor._fetcher is not None:
        predictor._fetcher.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("in") / "in.png"
    Image.new("RGB", (80, 64), (30, 120, 200)).save(path)
    return str(path)


def _transformer(predictor: QwenImageEditPredictor) -> Any:
    loaded = predictor._loaded
    assert loaded is not None
    return loaded.pipe.transformer


def _edit(
    predictor: QwenImageEditPredictor, image: str, out: Path, loras: list[dict[str, Any]]
) -> np.ndarray:
    values = QwenEditInput.model_validate(
        {"image": image, "prompt": "make the sky blue", "width": 64, "height": 64, "loras": loras}
    ).model_dump(mode="json")
    result = predict_now(predictor, values, Context(out))
    assert result.info.get("loras", 0) == len(loras)
    with Image.open(out / result.outputs[0]) as picture:
        return np.asarray(picture.convert("RGB")).astype(int)


def _no_adapters_left(predictor: QwenImageEditPredictor) -> bool:
    transformer = _transformer(predictor)
    return not any("lora_" in name for name, _ in transformer.named_modules())


def test_a_lora_changes_the_image_and_leaves_nothing_behind(
    predictor: QwenImageEditPredictor, image: str, hub: Server, tmp_path: Path, models_dir: Path
) -> None:
    url = hub.add("/loras/qwen_style.safetensors", tiny_lora(_transformer(predictor), 1))
    before = _edit(predictor, image, tmp_path / "before", [])
    with_lora = _edit(predictor, image, tmp_path / "lora", [{"source": url, "strength": 1.0}])
    assert np.abs(with_lora - before).max() > 0, "the LoRA changed nothing"
    assert _no_adapters_left(predictor)
    after = _edit(predictor, image, tmp_path / "after", [])
    assert np.array_equal(after, before), "a job without LoRAs is as before the LoRA job"
    again = _edit(predictor, image, tmp_path / "again", [{"source": url, "strength": 1.0}])
    assert np.array_equal(again, with_lora), "same seed, same LoRA: same image"
    assert len(hub.gets_of("/loras/qwen_style.safetensors")) == 1, "downloaded once, then cached"
    cached = list((models_dir / "loras" / "cache").glob("*.safetensors"))
    assert any(p.name.endswith("_qwen_style.safetensors") for p in cached)


def test_strengths_are_the_adapter_weights(
    predictor: QwenImageEditPredictor, image: str, hub: Server, tmp_path: Path
) -> None:
    transformer = _transformer(predictor)
    first = hub.add("/loras/s1.safetensors", tiny_lora(transformer, 2))
    # diffusers' own layout (`transformer.` keys), on other layers
    second = hub.add(
        "/loras/s2.safetensors",
        tiny_lora(transformer, 3, prefix="transformer.", targets=("img_mlp.net.2",)),
    )
    plain = _edit(predictor, image, tmp_path / "plain", [])
    off = _edit(predictor, image, tmp_path / "off", [{"source": first, "strength": 0.0}])
    assert np.array_equal(off, plain), "strength 0: the LoRA has no effect"
    half = _edit(predictor, image, tmp_path / "half", [{"source": first, "strength": 0.5}])
    full = _edit(predictor, image, tmp_path / "full", [{"source": first, "strength": 1.0}])
    assert not np.array_equal(half, full)
    both = _edit(
        predictor, image, tmp_path / "both", [{"source": first}, {"source": second, "strength": 2}]
    )
    assert not np.array_equal(both, full), "the second LoRA applies too"
    assert _no_adapters_left(predictor)


def test_a_lora_for_another_model_is_refused_naming_it(
    predictor: QwenImageEditPredictor, image: str, hub: Server, tmp_path: Path
) -> None:
    wrong = {
        "transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 48),
        "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.zeros(48, 4),
    }
    url = hub.add("/loras/other_model.safetensors", save(wrong))
    plain = _edit(predictor, image, tmp_path / "plain", [])
    ok = hub.add("/loras/fine.safetensors", tiny_lora(_transformer(predictor), 4))
    with pytest.raises(LoraInvalid, match=r"loras\[1\]\.source.*blocks\.9\.attn\.to_q"):
        _edit(predictor, image, tmp_path / "bad", [{"source": ok}, {"source": url}])
    assert _no_adapters_left(predictor), "the LoRA loaded before the bad one is unloaded"
    assert np.array_equal(_edit(predictor, image, tmp_path / "next", []), plain)


def test_an_unreachable_lora_fails_with_lora_unavailable(
    predictor: QwenImageEditPredictor, image: str, hub: Server, tmp_path: Path
) -> None:
    gone = f"{hub.url}/loras/gone.safetensors"
    with pytest.raises(LoraUnavailable, match=r"loras\[0\]\.source"):
        _edit(predictor, image, tmp_path / "gone", [{"source": gone}])


def test_nunchaku_refuses_loras(
    predictor: QwenImageEditPredictor, image: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loaded = predictor._loaded
    assert loaded is not None
    monkeypatch.setattr(loaded, "transformer_kind", pipeline_loader.NUNCHAKU_INT4)
    with pytest.raises(LoraInvalid, match="Nunchaku's 4-bit") as caught:
        _edit(predictor, image, tmp_path / "n", [{"source": "hf://a/b/c.safetensors"}])
    assert caught.value.details["field"] == "input.loras"


def test_loras_on_a_loaded_nunchaku_transformer_are_a_422_at_submit() -> None:
    """Once the worker says its transformer takes no job LoRAs, the API refuses them
    (InvalidInput: a 422 naming input.loras) instead of queuing a job that fails."""
    job = QwenEditInput.model_validate(
        {"image": "upl_a", "prompt": "x", "loras": [{"source": "hf://a/b/c.safetensors"}]}
    )
    nunchaku = {"job_loras": False, "transformer_kind": pipeline_loader.NUNCHAKU_INT4}
    with pytest.raises(InvalidInput, match="Nunchaku's 4-bit") as caught:
        SPEC.check_against_model(job, nunchaku)
    assert caught.value.details["field"] == "input.loras"
    SPEC.check_against_model(job, {})  # not loaded yet: the worker refuses it then
    SPEC.check_against_model(job, {"job_loras": True, "transformer_kind": "bf16"})
    SPEC.check_against_model(job.model_copy(update={"loras": []}), nunchaku)


@pytest.mark.parametrize(
    ("loras", "problem"),
    [
        ([{"source": "ftp://example.com/a.safetensors"}], "source"),
        ([{"source": "hf://org/repo/x.bin"}], "source"),
        ([{"source": "https://e.com/a.safetensors", "strength": 9}], "strength"),
        ([{"source": "https://e.com/a.safetensors", "applies_to": "high"}], "applies_to"),
        ([{"source": "https://e.com/a.safetensors"}] * 9, "loras"),
    ],
)
def test_bad_loras_are_refused_by_the_schema(loras: list[dict[str, Any]], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        QwenEditInput.model_validate({"image": "upl_a", "prompt": "x", "loras": loras})


# --- over HTTP, through the worker process ------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("qwen-loras")
    process = ServiceProcess(
        "model_service.cli",
        root / "data",
        env={
            "PROFILE": "tiny",
            "MODELS_DIR": str(root / "models"),
            "JOB_TIMEOUT_S": "120",
            "FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        },
        args=["serve", "qwen-image-edit-nunchaku"],
    )
    process.start(timeout=300)
    yield process
    process.stop()


def test_job_loras_over_http(
    service: ServiceProcess, predictor: QwenImageEditPredictor, hub: Server
) -> None:
    url = hub.add("/loras/http_style.safetensors", tiny_lora(_transformer(predictor), 5))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="PNG")
    picture = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with service.client() as client:

        def edit(loras: list[dict[str, Any]]) -> bytes:
            body = {
                "input": {
                    "image": picture,
                    "prompt": "make it blue",
                    "width": 64,
                    "height": 64,
                    "seed": 9,
                    "loras": loras,
                }
            }
            response = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"})
            assert response.status_code == 200, response.text
            job = response.json()
            assert job["status"] == "succeeded", job
            return bytes(client.get(job["outputs"][0]["url"]).content)

        before = edit([])
        with_lora = edit([{"source": url, "strength": 0.8}])
        after = edit([])
        assert with_lora != before
        assert after == before
        bad = client.post(
            "/v1/jobs",
            json={"input": {"image": picture, "prompt": "x", "loras": [{"source": "ftp://x/a"}]}},
        )
        assert bad.status_code == 422
        assert "loras" in bad.text
    assert len(hub.gets_of("/loras/http_style.safetensors")) == 1
