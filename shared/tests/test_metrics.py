"""Metric names: one prefix on all (provisioning's too), and the info metric's labels."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import generate_latest

from model_service.metrics import PREFIX, Metrics, model_labels, weights_facts
from model_service.provision import Manifest
from model_service.provision.download import ProvisionMetrics
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

ROOT = Path(__file__).resolve().parents[2]


def exposed_names(metrics: Metrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def test_every_metric_has_the_prefix_also_those_registered_by_other_modules() -> None:
    metrics = Metrics("svc", lambda: 3.0)
    ProvisionMetrics(metrics.registry)  # as the ComfyUI engine registers them
    names = exposed_names(metrics)
    assert {"model_service_jobs_queued", "model_service_model_download_remaining_bytes"} <= names
    assert all(name.startswith(PREFIX) for name in names), names
    assert metrics.registry.get_sample_value("model_service_jobs_queued") == 3.0


def test_the_info_metric_reads_the_model_at_each_scrape() -> None:
    metrics = Metrics("svc", lambda: 0.0)
    facts = {"model": ""}
    metrics.describe("1.2.3", lambda: {"model": facts["model"], "precision": "bf16"})
    labels = {"service": "svc", "version": "1.2.3", "model": "", "precision": "bf16"}
    assert metrics.registry.get_sample_value("model_service_info", labels) == 1.0
    facts["model"] = "loaded"  # the worker finished loading
    labels["model"] = "loaded"
    assert metrics.registry.get_sample_value("model_service_info", labels) == 1.0


def test_model_labels_prefer_what_the_engine_reports() -> None:
    qwen = {
        "variant": "edit-2509-lightning-4",
        "model": "Qwen/x",
        "transformer_kind": "nunchaku-fp4",
    }
    assert model_labels(qwen, {"model": "m", "precision": "p"}) == {
        "model": "edit-2509-lightning-4",
        "precision": "nunchaku-fp4",
    }
    assert model_labels({"comfyui_version": "0.3"}, {"model": "m", "precision": "p"}) == {
        "model": "m",
        "precision": "p",
    }
    assert model_labels({}, {}) == {"model": "", "precision": ""}


def test_weights_facts_of_the_comfyui_services() -> None:
    by_service = {
        json.loads(path.read_text())["service"]: weights_facts(path)
        for path in ROOT.glob("*/*/manifest.json")
    }
    assert len(by_service) == 3  # FastWan (both images share one), Wan2.2-14B, InfiniteTalk
    assert by_service["fastwan2.2-5b"] == {"model": "fastwan2.2-5b", "precision": "bf16"}
    assert by_service["wan2.2-14b"] == {"model": "wan2.2-14b", "precision": "fp8_scaled"}
    assert by_service["infinite-talk"]["precision"] == "fp8_e4m3fn_scaled"


def test_weights_facts_prefer_a_loader_cast_and_survive_a_bad_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "service": "s",
                "files": [{"folder": "diffusion_models", "name": "m_fp16.safetensors"}],
            }
        )
    )
    graph = {"1": {"class_type": "UNETLoader", "inputs": {"weight_dtype": "fp8_e4m3fn"}}}
    assert weights_facts(manifest, [graph]) == {"model": "s", "precision": "fp8_e4m3fn"}
    assert weights_facts(manifest) == {"model": "s", "precision": "fp16"}
    manifest.write_text("not json")
    assert weights_facts(manifest) == {}
    assert weights_facts(None) == {}


def test_a_comfyui_service_names_its_model_and_precision(
    comfy_standin: StartStandin, comfy_service: StartComfyService
) -> None:
    from fastwan.service import MANIFEST

    models = {file.folder: [file.name] for file in Manifest.load(MANIFEST).files}
    service = comfy_service("fastwan2.2-5b-packed", comfy_standin(models=models))
    with service.client() as client:
        text = client.get("/metrics").text
        info = client.get("/v1/service").json()
        version = info["version"]
    assert (info["model"]["model"], info["model"]["precision"]) == ("fastwan2.2-5b", "bf16")
    assert (
        'model_service_info{model="fastwan2.2-5b",precision="bf16",'
        f'service="fastwan2.2-5b-packed",version="{version}"}} 1.0'
    ) in text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert all(name.startswith(PREFIX) for name in names), names
