"""Per-job LoRAs on FastWan: the chain of LoraLoaderModelOnly between the UNETLoader and
ModelSamplingSD3 (where ComfyUI's Wan2.2 templates put a model LoRA), built directly and
as the stand-in ComfyUI received it; LoRAs served by a real HTTP server on loopback (a
plain URL and a Hub look-alike), downloaded once into the LoRA cache and reused. With
COMFYUI_TEST_DIR, a tiny LoRA really applies on a real ComfyUI (tiny weights)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastwan.schema import FastWanInput
from fastwan.service import MANIFEST, SHIFT, TI2V, UNET
from model_service.comfy.tiny_weights import write_tiny
from model_service.provision import Manifest
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.hub_standin import Server
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import png_data_uri, video_frames
from model_service_testing.process import ServiceProcess, run_waiting
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

FILES = Manifest.load(MANIFEST).files
MODELS = {file.folder: [file.name] for file in FILES}
SMALL = {"width": 64, "height": 64, "num_frames": 9, "fps": 8}


def _lora_bytes(tmp: Path, seed: int) -> bytes:
    """A real (tiny) LoRA for the tiny Wan2.2 TI2V-5B DiT (dim 128): rank-4 pairs."""
    path = tmp / f"lora{seed}.safetensors"
    write_tiny("wan_lora_128", path, seed=seed)
    return path.read_bytes()


def _values(**given: Any) -> dict[str, Any]:
    """A job's values as the engine hands them to `build` (LoRAs named in the cache)."""
    model = FastWanInput.model_validate({"prompt": "p", "seed": 7, **SMALL, **given})
    values = model.model_dump(mode="json")
    for index, lora in enumerate(values["loras"]):
        lora["lora_name"] = f"cache/l{index}.safetensors"
    return values


def lora_chain(graph: dict[str, Any]) -> list[tuple[str, float]]:
    """The LoRAs on the model path from ModelSamplingSD3 back to the UNETLoader, nearest
    the UNet first, as (file, strength)."""
    chain, node = [], graph[SHIFT]["inputs"]["model"][0]
    while graph[node]["class_type"] == "LoraLoaderModelOnly":
        inputs = graph[node]["inputs"]
        chain.append((inputs["lora_name"], inputs["strength_model"]))
        node = inputs["model"][0]
    assert node == UNET
    assert graph[node]["class_type"] == "UNETLoader"
    return chain[::-1]


# --- the graph (no server needed) -------------------------------------------------------


def test_no_loras_leave_the_template_graph() -> None:
    graph = TI2V.build(_values(), tag="t")
    assert graph[SHIFT]["inputs"]["model"] == [UNET, 0]
    assert not [n for n in graph.values() if n["class_type"] == "LoraLoaderModelOnly"]


def test_loras_chain_between_the_unet_and_the_shift_in_order() -> None:
    loras = [
        {"source": "https://example.com/a.safetensors", "strength": 0.6},
        {"source": "hf://someone/wan5b/b.safetensors", "strength": -1.5},
        {"source": "https://example.com/c.safetensors"},
    ]
    for start_image in (None, "jobs/x.png"):  # text- and image-to-video: one model path
        graph = TI2V.build(_values(loras=loras, start_image=start_image), tag="t")
        assert lora_chain(graph) == [
            ("cache/l0.safetensors", 0.6),
            ("cache/l1.safetensors", -1.5),
            ("cache/l2.safetensors", 1.0),
        ]
        assert graph["61"]["inputs"]["model"] == [SHIFT, 0], "the sampler keeps the shift"
    assert TI2V.graph[SHIFT]["inputs"]["model"] == [UNET, 0], "the template is untouched"


@pytest.mark.parametrize(
    ("loras", "problem"),
    [
        ([{"source": "ftp://example.com/a.safetensors"}], "source"),
        ([{"source": "hf://org/repo/x.bin"}], "source"),
        ([{"source": "https://e.com/a.safetensors", "strength": 6}], "strength"),
        ([{"source": "https://e.com/a.safetensors", "applies_to": "high"}], "applies_to"),
        ([{"source": "https://e.com/a.safetensors"}] * 9, "loras"),
    ],
)
def test_bad_loras_are_refused_with_the_reason(loras: list[Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FastWanInput.model_validate({"prompt": "p", **SMALL, "loras": loras})


# --- the service against the stand-in ComfyUI -------------------------------------------


@pytest.fixture(scope="module")
def standin(comfy_standin: StartStandin) -> StandinProcess:
    return comfy_standin(models=MODELS)


@pytest.fixture(scope="module")
def service(
    standin: StandinProcess, hub: Server, comfy_service: StartComfyService
) -> ServiceProcess:
    return comfy_service(
        "fastwan2.2-5b-packed",
        standin,
        env={
            # the LoRA cache in the folder the stand-in lists its `loras` from
            "MODELS_DIR": str(standin.base_dir / "models"),
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
        },
    )


@pytest.fixture
def client(service: ServiceProcess, standin: StandinProcess) -> Iterator[httpx.Client]:
    standin.configure(reset=True)
    with service.client() as http:
        yield http


def test_job_loras_are_downloaded_once_and_reach_comfyui(
    client: httpx.Client, standin: StandinProcess, hub: Server, tmp_path: Path
) -> None:
    url = hub.add("/loras/fw_style.safetensors", _lora_bytes(tmp_path, 1))
    hub.add("/hub/someone/fastwan-loras/motion.safetensors", _lora_bytes(tmp_path, 2))
    loras = [
        {"source": url, "strength": 0.8},
        {"source": "hf://someone/fastwan-loras/motion.safetensors", "strength": 0.5},
    ]
    for payload in ({}, {"start_image": png_data_uri()}):
        job = run_waiting(client, {"prompt": "p", **SMALL, **payload, "loras": loras})
        assert job["status"] == "succeeded", job.get("error")
        chain = lora_chain(standin.stats()["prompts"][-1])
        assert [strength for _, strength in chain] == [0.8, 0.5]
        assert chain[0][0].startswith("cache/")
        assert chain[0][0].endswith("_fw_style.safetensors")
        assert chain[1][0].endswith("_motion.safetensors")
    assert len(hub.gets_of("/loras/fw_style.safetensors")) == 1, "downloaded once, then cached"
    cached = list((standin.base_dir / "models" / "loras" / "cache").glob("*.safetensors"))
    assert len(cached) == 2
    plain = run_waiting(client, {"prompt": "p", **SMALL})
    assert plain["status"] == "succeeded", plain.get("error")
    assert lora_chain(standin.stats()["prompts"][-1]) == [], "the next job has none"


def test_an_unreachable_lora_fails_the_job_before_comfyui_works(
    client: httpx.Client, hub: Server, standin: StandinProcess
) -> None:
    source = f"{hub.url}/loras/gone.safetensors"
    before = len(standin.stats()["prompts"])
    job = run_waiting(client, {"prompt": "p", **SMALL, "loras": [{"source": source}]})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "lora_unavailable", job["error"]
    assert len(standin.stats()["prompts"]) == before, "nothing was queued in ComfyUI"


# --- PROFILE=tiny on a real ComfyUI (COMFYUI_TEST_DIR) -------------------------------------


@pytest.fixture(scope="module")
def tiny_service(tiny_comfy_service: StartComfyService, hub: Server) -> ServiceProcess:
    return tiny_comfy_service("fastwan2.2-5b-packed", {"FETCH_ALLOW_NETWORKS": "127.0.0.0/8"})


@needs_real_comfyui
def test_a_lora_applies_on_a_real_comfyui(
    tiny_service: ServiceProcess, hub: Server, tmp_path: Path
) -> None:
    """ComfyUI loads every tensor of the tiny LoRA into the tiny TI2V-5B DiT (a key it
    could not place would fail the job: comfy.lora_log), and the video changes."""
    url = hub.add("/loras/tiny_real.safetensors", _lora_bytes(tmp_path, 3))
    with tiny_service.client() as http:
        payload = {"prompt": "a red fox", "seed": 1, **SMALL}
        plain = run_waiting(http, payload)
        with_lora = run_waiting(http, {**payload, "loras": [{"source": url, "strength": 4.0}]})
        assert plain["status"] == with_lora["status"] == "succeeded", with_lora.get("error")
        videos = [http.get(job["outputs"][0]["url"]).content for job in (plain, with_lora)]
        assert video_frames(videos[0]) != video_frames(videos[1])
