"""Per-job LoRAs on InfiniteTalk: a chain of LoraLoaderModelOnly on the Wan2.1 I2V 14B
model after the lightx2v LoRA, before the InfiniteTalk patch (WanInfiniteTalkToVideo), for
every window; built directly and as the stand-in ComfyUI received it, the LoRAs served by
a real HTTP server on loopback, downloaded once into the LoRA cache and reused. With
COMFYUI_TEST_DIR, a tiny LoRA really applies on a real ComfyUI (tiny weights)."""

from __future__ import annotations

import io
import math
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from infinitetalk.schema import InfiniteTalkInput
from infinitetalk.service import LIGHTX2V, MANIFEST, TALK, WINDOW
from model_service.comfy.tiny_weights import write_tiny
from model_service.provision import Manifest
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.hub_standin import Server
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import data_uri, video_frames
from model_service_testing.process import ServiceProcess, place_sparse_models
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

FILES = Manifest.load(MANIFEST).files
SMALL = {"width": 64, "height": 64, "steps": 2}


def _lora_bytes(tmp: Path, seed: int) -> bytes:
    """A real (tiny) Wan LoRA for the tiny Wan2.1 I2V 14B DiT (dim 160): rank-4 pairs."""
    path = tmp / f"lora{seed}.safetensors"
    write_tiny("wan_lora", path, seed=seed)
    return path.read_bytes()


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.5 * np.sin(2 * math.pi * 220 * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 150, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def _graph(windows: int, loras: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The graph `build` makes of a job's values (LoRAs named in the cache)."""
    model = InfiniteTalkInput.model_validate(
        {"image": "upl_face", "audio": "upl_speech", "seed": 3, **SMALL, "loras": loras}
    )
    values = model.model_dump(mode="json") | {
        "image": "jobs/face.png",
        "audio": "jobs/speech.wav",
        "window_frames": 17,
        "frames": 17 + 8 * (windows - 1),
        "windows": windows,
        **extra,
    }
    for index, lora in enumerate(values["loras"]):
        lora["lora_name"] = f"cache/l{index}.safetensors"
    return TALK.build(values, tag="t")


def window_models(graph: dict[str, Any]) -> list[list[tuple[str, float]]]:
    """For each window (WanInfiniteTalkToVideo), the LoRAs on its model path, nearest the
    UNet first; the lightx2v LoRA (the template's) must be the first, on the UNETLoader."""
    chains = []
    for node in graph.values():
        if node["class_type"] != "WanInfiniteTalkToVideo":
            continue
        chain, at = [], node["inputs"]["model"][0]
        while graph[at]["class_type"] == "LoraLoaderModelOnly":
            inputs = graph[at]["inputs"]
            chain.append((inputs["lora_name"], inputs["strength_model"]))
            at = inputs["model"][0]
        assert graph[at]["class_type"] == "UNETLoader"
        chain.reverse()
        assert chain[0] == (graph[LIGHTX2V]["inputs"]["lora_name"], 1.0)
        chains.append(chain[1:])
    return chains


LORAS = [
    {"source": "https://example.com/voice.safetensors", "strength": 0.7},
    {"source": "hf://someone/wan21-loras/style.safetensors", "strength": -0.5},
]


# --- the graph (no server needed) -------------------------------------------------------


def test_no_loras_leave_the_template_graph() -> None:
    graph = _graph(1, [])
    assert graph[WINDOW]["inputs"]["model"] == [LIGHTX2V, 0]
    assert window_models(graph) == [[]]


@pytest.mark.parametrize(
    "extra",
    [{}, {"clip_vision": True}, {"second_audio": "jobs/b.wav", "mask_1": "m1", "mask_2": "m2"}],
)
def test_every_window_gets_the_loras_after_lightx2v_before_the_patch(
    extra: dict[str, Any],
) -> None:
    graph = _graph(3, LORAS, **extra)
    expected = [("cache/l0.safetensors", 0.7), ("cache/l1.safetensors", -0.5)]
    assert window_models(graph) == [expected] * 3
    loaders = [n for n in graph.values() if n["class_type"] == "LoraLoaderModelOnly"]
    assert len(loaders) == 1 + len(LORAS), "one chain, shared by the windows"
    # the nodes the options add keep their own ids (the chain's come after them)
    if extra.get("clip_vision"):
        assert graph["41"]["class_type"] == "CLIPVisionLoader"
        assert graph[WINDOW]["inputs"]["clip_vision_output"] == ["42", 0]
    if extra.get("second_audio"):
        assert graph["30"]["class_type"] == "LoadAudio"
        assert graph[WINDOW]["inputs"]["mode.mask_1"] == ["32", 0]
    # the patch and the samplers take the patched model of their window, as before
    assert graph["15"]["inputs"]["model"] == [WINDOW, 0]
    assert TALK.graph[WINDOW]["inputs"]["model"] == [LIGHTX2V, 0], "the template is untouched"


@pytest.mark.parametrize(
    ("loras", "problem"),
    [
        ([{"source": "ftp://example.com/a.safetensors"}], "source"),
        ([{"source": "https://e.com/a.safetensors", "strength": -6}], "strength"),
        ([{"source": "https://e.com/a.safetensors", "applies_to": "low"}], "applies_to"),
        ([{"source": "https://e.com/a.safetensors"}] * 9, "loras"),
    ],
)
def test_bad_loras_are_refused_with_the_reason(loras: list[Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        InfiniteTalkInput.model_validate({"image": "upl_a", "audio": "upl_b", "loras": loras})


# --- the service against the stand-in ComfyUI -------------------------------------------


@pytest.fixture(scope="module")
def standin(comfy_standin: StartStandin) -> StandinProcess:
    process = comfy_standin()
    place_sparse_models(process.base_dir / "models", FILES)  # "downloaded"
    return process


@pytest.fixture(scope="module")
def service(
    standin: StandinProcess, hub: Server, comfy_service: StartComfyService
) -> ServiceProcess:
    return comfy_service(
        "infinite-talk-v1",
        standin,
        env={
            "MODELS_DIR": str(standin.base_dir / "models"),
            "MAX_AUDIO_S": "8",
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


def _talk(client: httpx.Client, seconds: float, **extra: Any) -> dict[str, Any]:
    payload = {
        "image": data_uri(_png(), "image/png"),
        "audio": data_uri(_wav(seconds), "audio/wav"),
        **SMALL,
        **extra,
    }
    response = client.post("/v1/jobs", json={"input": payload}, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def test_job_loras_are_downloaded_once_and_reach_every_window(
    client: httpx.Client, standin: StandinProcess, hub: Server, tmp_path: Path
) -> None:
    url = hub.add("/loras/it_style.safetensors", _lora_bytes(tmp_path, 1))
    hub.add("/hub/someone/wan21-loras/face.safetensors", _lora_bytes(tmp_path, 2))
    loras = [
        {"source": url, "strength": 0.8},
        {"source": "hf://someone/wan21-loras/face.safetensors", "strength": 1.2},
    ]
    for seconds in (0.6, 1.0):  # one window, then three (17 frames each, 8 new)
        job = _talk(client, seconds, window_frames=17, loras=loras)
        assert job["status"] == "succeeded", job.get("error")
        chains = window_models(standin.stats()["prompts"][-1])
        assert len(chains) == job["info"]["derived"]["windows"]
        for chain in chains:
            assert [strength for _, strength in chain] == [0.8, 1.2]
            assert chain[0][0].startswith("cache/")
            assert chain[0][0].endswith("_it_style.safetensors")
            assert chain[1][0].endswith("_face.safetensors")
    assert len(hub.gets_of("/loras/it_style.safetensors")) == 1, "downloaded once, then cached"
    cached = list((standin.base_dir / "models" / "loras" / "cache").glob("*.safetensors"))
    assert len(cached) == 2
    plain = _talk(client, 0.6)
    assert plain["status"] == "succeeded", plain.get("error")
    assert window_models(standin.stats()["prompts"][-1]) == [[]], "the next job has none"


def test_an_unreachable_lora_fails_the_job_before_comfyui_works(
    client: httpx.Client, hub: Server, standin: StandinProcess
) -> None:
    source = f"{hub.url}/loras/gone.safetensors"
    before = len(standin.stats()["prompts"])
    job = _talk(client, 0.6, loras=[{"source": source}])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "lora_unavailable", job["error"]
    assert len(standin.stats()["prompts"]) == before, "nothing was queued in ComfyUI"


# --- PROFILE=tiny on a real ComfyUI (COMFYUI_TEST_DIR) -------------------------------------


@pytest.fixture(scope="module")
def tiny_service(tiny_comfy_service: StartComfyService, hub: Server) -> ServiceProcess:
    return tiny_comfy_service("infinite-talk-v1", {"FETCH_ALLOW_NETWORKS": "127.0.0.0/8"})


@needs_real_comfyui
def test_a_lora_applies_on_a_real_comfyui(
    tiny_service: ServiceProcess, hub: Server, tmp_path: Path
) -> None:
    """ComfyUI loads every tensor of the tiny LoRA into the tiny Wan2.1 I2V DiT (a key it
    could not place would fail the job: comfy.lora_log), and the video changes."""
    url = hub.add("/loras/tiny_real.safetensors", _lora_bytes(tmp_path, 3))
    with tiny_service.client() as http:
        payload = {"seed": 1, "window_frames": 81}
        plain = _talk(http, 0.6, **payload)
        with_lora = _talk(http, 0.6, **payload, loras=[{"source": url, "strength": 4.0}])
        assert plain["status"] == with_lora["status"] == "succeeded", with_lora.get("error")
        videos = [http.get(job["outputs"][0]["url"]).content for job in (plain, with_lora)]
        assert video_frames(videos[0]) != video_frames(videos[1])
