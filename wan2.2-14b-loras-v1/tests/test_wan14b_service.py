"""The Wan2.2-14B service end to end: a real service process on loopback with the
stand-in ComfyUI (a real process speaking ComfyUI's protocol) as its backend, LoRAs
served by a real HTTP server on loopback (plain URLs and a Hub look-alike).

The graph each input builds is checked directly (`<workflow>.build`) and as the stand-in
received it; that ComfyUI accepts it is checked by the stand-in's validation (a real
/object_info) and, with COMFYUI_TEST_DIR, by a real ComfyUI on tiny weights.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save

from model_service.comfy.tiny_weights import write_tiny
from model_service.comfy.workflow import sampler_steps
from model_service.provision import Manifest
from model_service_testing.comfy_sigmas import schedule
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.hub_standin import Server
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import (
    data_uri,
    frame_colours,
    mp4_bytes,
    png_data_uri,
    video_facts,
    video_frames,
)
from model_service_testing.process import (
    RedisServer,
    ServiceProcess,
    place_sparse_models,
    run_waiting,
    wait_status,
)
from model_service_testing.pytest_plugin import StartComfyService, StartStandin
from wan14b.schema import WAN_NEGATIVE, Wan14bInput
from wan14b.service import FLF, I2V, MANIFEST, T2V, choose

FILES = Manifest.load(MANIFEST).files
SMALL = {"width": 64, "height": 64, "num_frames": 9, "fps": 8}


def _lora_bytes(tmp: Path, seed: int) -> bytes:
    """A real (tiny) Wan LoRA: rank-4 lora_down/lora_up pairs in safetensors."""
    path = tmp / f"lora{seed}.safetensors"
    write_tiny("wan_lora", path, seed=seed)
    return path.read_bytes()


def _renamed_lora(
    tmp: Path, seed: int, rename: Callable[[str], str], kind: str = "wan_lora"
) -> bytes:
    """A tiny Wan LoRA (`diffusion_model.blocks.0.<layer>.lora_{down,up}.weight`, `.alpha`)
    with its tensors renamed: another format ComfyUI reads, or another model's names."""
    path = tmp / f"{kind}{seed}.safetensors"
    write_tiny(kind, path, seed=seed)
    return save({rename(key): value for key, value in load_file(path).items()})


def _split(key: str) -> tuple[str, str]:
    """`diffusion_model.blocks.0.ffn.0.lora_up.weight` → (`blocks.0.ffn.0`, `.lora_up.weight`)."""
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if key.endswith(suffix):
            return key[: -len(suffix)].removeprefix("diffusion_model."), suffix
    raise AssertionError(key)


def kohya(key: str) -> str:
    layer, suffix = _split(key)
    return "lora_unet_" + layer.replace(".", "_") + suffix


def lora_a_b(key: str) -> str:
    return key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.", ".lora_B.")


def other_architecture(key: str) -> str:
    return key.replace(".blocks.0.", ".double_blocks.0.")  # no such layer in a Wan DiT


def loha(key: str) -> str:
    """Kohya-named LoHa: each up/down pair as both Hadamard factors (hada_w1_*, hada_w2_*)."""
    layer, suffix = _split(key)
    part = {".lora_up.weight": "hada_w1_a", ".lora_down.weight": "hada_w1_b", ".alpha": "alpha"}
    return f"lora_unet_{layer.replace('.', '_')}.{part[suffix]}"


def _loha_bytes(tmp: Path, seed: int, kind: str) -> bytes:
    path = tmp / f"loha_{kind}{seed}.safetensors"
    write_tiny(kind, path, seed=seed)
    tensors = {loha(key): value for key, value in load_file(path).items()}
    second = {k.replace("hada_w1", "hada_w2"): v for k, v in tensors.items() if "hada_w1" in k}
    return save(tensors | second)


def _values(**given: Any) -> dict[str, Any]:
    """A job's values as the engine hands them to `build` (validated, defaults filled)."""
    model = Wan14bInput.model_validate({"prompt": "p", "seed": 7, **SMALL, **given})
    values = model.model_dump(mode="json")
    for index, lora in enumerate(values["loras"]):
        lora["lora_name"] = f"cache/l{index}.safetensors"
    return values


def _links(graph: dict[str, Any], node: str, name: str = "model") -> str:
    return str(graph[node]["inputs"][name][0])


def _chain(graph: dict[str, Any], sampler: str) -> list[str]:
    """The LoRAs on the model path into a sampler, nearest first, then the UNet file."""
    path, node = [], _links(graph, sampler)
    while True:
        kind, inputs = graph[node]["class_type"], graph[node]["inputs"]
        if kind == "UNETLoader":
            return [*path, f"UNETLoader:{inputs['unet_name']}"]
        if kind == "LoraLoaderModelOnly":
            path.append(f"LoRA:{inputs['lora_name']}")
        node = _links(graph, node)


# --- the graph each input builds (no server needed) ------------------------------------


def test_modes_follow_the_images() -> None:
    assert choose(_values()) == "t2v"
    assert choose(_values(start_image="x")) == "i2v"
    assert choose(_values(start_image="x", end_image="y")) == "flf"
    t2v = T2V.build(_values(), tag="t")
    assert {n["class_type"] for n in t2v.values()} >= {"EmptyHunyuanLatentVideo"}
    assert not any(n["class_type"] == "LoadImage" for n in t2v.values())
    i2v = I2V.build(_values(start_image="start.png"), tag="t")
    assert i2v["11"]["inputs"]["image"] == "start.png"
    assert i2v["12"]["class_type"] == "WanImageToVideo"
    flf = FLF.build(_values(start_image="a.png", end_image="b.png"), tag="t")
    assert flf["12"]["class_type"] == "WanFirstLastFrameToVideo"
    assert (flf["11"]["inputs"]["image"], flf["18"]["inputs"]["image"]) == ("a.png", "b.png")


def test_two_experts_split_the_steps() -> None:
    graph = I2V.build(_values(start_image="s.png", steps=6, split_step=2, cfg=2.0), tag="t")
    high, low = graph["13"]["inputs"], graph["14"]["inputs"]
    assert (high["start_at_step"], high["end_at_step"], high["steps"]) == (0, 2, 6)
    assert (low["start_at_step"], low["end_at_step"], low["steps"]) == (2, 10000, 6)
    assert high["return_with_leftover_noise"] == "enable"
    assert low["add_noise"] == "disable"
    assert high["noise_seed"] == low["noise_seed"] == 7
    assert high["cfg"] == low["cfg"] == 2.0
    assert sampler_steps(graph) == 6
    assert "wan2.2_i2v_high" in _chain(graph, "13")[-1]
    assert "wan2.2_i2v_low" in _chain(graph, "14")[-1]


def test_lightning_is_the_default_and_can_be_left_out() -> None:
    fast = _values(start_image="s.png")
    assert (fast["steps"], fast["split_step"], fast["cfg"]) == (4, 2, 1.0)
    graph = I2V.build(fast, tag="t")
    assert _chain(graph, "13")[0].endswith("lightx2v_4steps_lora_v1_high_noise.safetensors")
    assert _chain(graph, "14")[0].endswith("lightx2v_4steps_lora_v1_low_noise.safetensors")
    t2v = T2V.build(_values(), tag="t")
    assert _chain(t2v, "13")[0].endswith("lightx2v_4steps_lora_v1.1_high_noise.safetensors")
    full = _values(start_image="s.png", lightning=False)
    assert (full["steps"], full["split_step"], full["cfg"]) == (20, 10, 3.5)
    graph = I2V.build(full, tag="t")
    assert "3" not in graph
    assert "4" not in graph
    assert len(_chain(graph, "13")) == len(_chain(graph, "14")) == 1  # straight to the UNet


@pytest.mark.parametrize(
    ("mode", "day"), [({}, "1217"), ({"start_image": "s.png"}, "1022")], ids=["t2v", "i2v"]
)
def test_the_distill_pair_replaces_the_built_in_one(mode: dict[str, Any], day: str) -> None:
    """`lightning_loras: distill`: lightx2v/Wan2.2-Distill-Loras (t2v 1217, i2v 1022), one
    per expert, first in `loras`, with the lightning defaults (the same 4 timesteps); the
    built-in pair leaves the graph; the caller's own LoRAs follow."""
    own = {"source": "https://example.com/own.safetensors", "applies_to": "low"}
    model = Wan14bInput.model_validate(
        {"prompt": "p", **SMALL, **mode, "lightning_loras": "distill", "loras": [own]}
    )
    assert [(lora.source.rsplit("/", 1)[1], lora.applies_to) for lora in model.loras] == [
        (
            f"wan2.2_{'i2v' if mode else 't2v'}_A14b_high_noise_lora_rank64_lightx2v_4step_{day}"
            ".safetensors",
            "high",
        ),
        (
            f"wan2.2_{'i2v' if mode else 't2v'}_A14b_low_noise_lora_rank64_lightx2v_4step_{day}"
            ".safetensors",
            "low",
        ),
        ("own.safetensors", "low"),
    ]
    assert model.loras[0].source.startswith("hf://lightx2v/Wan2.2-Distill-Loras/")
    assert (model.steps, model.split_step, model.cfg, model.shift) == (4, 2, 1.0, 5.0)
    again = Wan14bInput.model_validate(model.model_dump(mode="json"))
    assert len(again.loras) == 3, "validated again (a stored job), still one pair"
    values = _values(**mode, lightning_loras="distill", loras=[own])
    graph = (I2V if mode else T2V).build(values, tag="t")
    assert not {"3", "4"} & set(graph)  # the built-in pair
    assert _chain(graph, "13")[:-1] == ["LoRA:cache/l0.safetensors"]
    assert _chain(graph, "14")[:-1] == ["LoRA:cache/l2.safetensors", "LoRA:cache/l1.safetensors"]
    plain = Wan14bInput.model_validate(
        {"prompt": "p", "lightning": False, "lightning_loras": "distill"}
    )
    assert plain.loras == [], "no 4-step pair without lightning"


# --- fidelity: each mode's defaults as ComfyUI's Wan2.2 14B templates set them -------------
# comfyui-workflow-templates-json 0.1.47, video_wan2_2_14B_{t2v,i2v,flf2v}.json; the
# negative prompt: Wan-Video/Wan2.2 wan/configs/shared_config.py `sample_neg_prompt`.


@pytest.mark.parametrize(
    ("images", "lightning", "expected"),
    [
        ({}, True, (4, 2, 1.0, 5.0)),
        ({"start_image": "s.png"}, True, (4, 2, 1.0, 5.0)),
        ({"start_image": "s.png", "end_image": "e.png"}, True, (4, 2, 1.0, 5.0)),
        ({}, False, (20, 10, 3.5, 5.0)),
        ({"start_image": "s.png"}, False, (20, 10, 3.5, 5.0)),
        ({"start_image": "s.png", "end_image": "e.png"}, False, (20, 10, 4.0, 8.0)),
    ],
)
def test_defaults_per_mode_are_the_templates(
    images: dict[str, str], lightning: bool, expected: tuple[int, int, float, float]
) -> None:
    values = _values(**images, lightning=lightning)
    assert (values["steps"], values["split_step"], values["cfg"], values["shift"]) == expected
    graph = {"t2v": T2V, "i2v": I2V, "flf": FLF}[choose(values)].build(values, tag="t")
    assert graph["5"]["inputs"]["shift"] == graph["6"]["inputs"]["shift"] == expected[3]
    assert graph["13"]["inputs"]["cfg"] == graph["14"]["inputs"]["cfg"] == expected[2]
    for sampler in ("13", "14"):
        inputs = graph[sampler]["inputs"]
        assert (inputs["sampler_name"], inputs["scheduler"]) == ("euler", "simple")


def test_lightning_steps_are_the_distilled_timesteps() -> None:
    """lightx2v's Wan2.2-Lightning samples 4 steps at shift 5 (ModelTC/Wan2.2-Lightning
    configs, `sample_shift 5.0`): timesteps 1000, 937.5, 833.3, 625; ComfyUI's `simple`
    scheduler at shift 5 gives exactly those σ, and the experts switch after step 2."""
    sigmas = schedule("simple", 4, 5.0)
    assert sigmas == pytest.approx([1.0, 0.9375, 0.833333, 0.625, 0.0], abs=1e-6)


def test_the_negative_prompt_is_wans_standard_unless_given() -> None:
    full = _values(lightning=False)
    assert full["negative_prompt"] == WAN_NEGATIVE
    assert T2V.build(full, tag="t")["9"]["inputs"]["text"] == WAN_NEGATIVE
    assert WAN_NEGATIVE.endswith("倒着走")
    assert _values(negative_prompt="")["negative_prompt"] == ""  # "" means none
    assert _values(negative_prompt="blur")["negative_prompt"] == "blur"


@pytest.mark.parametrize(
    ("applies", "high", "low"),
    [
        (["high"], ["cache/l0.safetensors"], []),
        (["low"], [], ["cache/l0.safetensors"]),
        (["both"], ["cache/l0.safetensors"], ["cache/l0.safetensors"]),
        (
            ["both", "high", "low"],
            ["cache/l1.safetensors", "cache/l0.safetensors"],
            ["cache/l2.safetensors", "cache/l0.safetensors"],
        ),
    ],
)
def test_loras_are_chained_onto_their_expert(
    applies: list[str], high: list[str], low: list[str]
) -> None:
    loras = [
        {"source": f"https://example.com/l{i}.safetensors", "strength": 0.5 + i, "applies_to": a}
        for i, a in enumerate(applies)
    ]
    for lightning in (True, False):
        graph = I2V.build(_values(start_image="s.png", loras=loras, lightning=lightning), tag="t")
        got_high = [p.split(":")[1] for p in _chain(graph, "13")[: len(high)]]
        got_low = [p.split(":")[1] for p in _chain(graph, "14")[: len(low)]]
        assert (got_high, got_low) == (high, low)
        extra = len(_chain(graph, "13")) - len(high) - 1
        assert extra == (1 if lightning else 0)  # the lightning LoRA stays next to the UNet
    strengths = {
        n["inputs"]["lora_name"]: n["inputs"]["strength_model"]
        for n in graph.values()
        if n["class_type"] == "LoraLoaderModelOnly"
    }
    assert strengths["cache/l0.safetensors"] == 0.5


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"num_frames": 80}, r"4n\+1"),
        ({"width": 100, "height": 64}, "multiple of 16"),
        ({"width": 1280, "height": 1280}, "larger than 720p"),
        ({"end_image": "x"}, "needs a start_image"),
        ({"steps": 4, "split_step": 4}, "split_step"),
        ({"loras": [{"source": "ftp://example.com/a.safetensors"}]}, "source"),
        ({"loras": [{"source": "hf://org/repo/x.bin"}]}, "source"),
        ({"loras": [{"source": "https://e.com/a.safetensors", "applies_to": "mid"}]}, "applies"),
        ({"loras": [{"source": "https://e.com/a.safetensors"}] * 9}, "loras"),
    ],
)
def test_bad_input_is_refused_with_the_reason(payload: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Wan14bInput.model_validate({"prompt": "p", **SMALL, **payload})


def test_manifest_names_every_model_the_workflows_load() -> None:
    names = {(f.folder, f.name) for f in FILES}
    for workflow in (T2V, I2V, FLF):
        assert set(workflow.model_files()) <= names, workflow.name
    assert all(f.tiny for f in FILES)


# --- the service against the stand-in ComfyUI ------------------------------------------


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
        "wan2.2-14b-loras-v1",
        standin,
        env={
            "MODELS_DIR": str(standin.base_dir / "models"),
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",  # other test modules set it for their own process
            "FETCH_ALLOW_NETWORKS": "127.0.0.0/8",
            "LORA_CACHE_GB": "0.0025",  # 2.5 MB: room for two of the 1 MB test LoRAs
            "CANCEL_GRACE_S": "3",
        },
    )


@pytest.fixture
def client(service: ServiceProcess, standin: StandinProcess) -> Iterator[httpx.Client]:
    standin.configure(reset=True)
    with service.client() as http:
        yield http


def _last_prompt(standin: StandinProcess) -> dict[str, Any]:
    prompt: dict[str, Any] = standin.stats()["prompts"][-1]
    return prompt


def _video_facts(data: bytes) -> tuple[str, int, int, int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, stream.width, stream.height, frames


def test_a_portrait_start_image_makes_a_portrait_video(client: httpx.Client) -> None:
    """No size given: the image's shape at the 480p budget by Wan2.2 A14B's own rule
    (image2video.py), not the 832x480 landscape crop of a portrait photo."""
    portrait = png_data_uri(size=(480, 832))
    for extra in ({}, {"end_image": png_data_uri((0, 0, 255), size=(480, 832))}):
        job = run_waiting(
            client, {"prompt": "p", "start_image": portrait, "num_frames": 5, "fps": 8, **extra}
        )
        assert job["status"] == "succeeded", job.get("error")
        assert job["info"]["derived"] == {"width": 480, "height": 832}
        data = client.get(job["outputs"][0]["url"]).content
        assert _video_facts(data)[1:3] == (480, 832)


def test_each_mode_returns_an_h264_mp4(client: httpx.Client, standin: StandinProcess) -> None:
    for payload, mode in (
        ({}, "t2v"),
        ({"start_image": png_data_uri()}, "i2v"),
        ({"start_image": png_data_uri(), "end_image": png_data_uri((0, 0, 255))}, "flf"),
    ):
        job = run_waiting(client, {"prompt": "a red fox", **SMALL, **payload})
        assert job["status"] == "succeeded", job.get("error")
        assert job["info"]["workflow"] == mode
        assert _video_facts(client.get(job["outputs"][0]["url"]).content) == ("h264", 64, 64, 9)
        sent = _last_prompt(standin)
        loads = sorted(
            n["inputs"]["image"] for n in sent.values() if n["class_type"] == "LoadImage"
        )
        assert len(loads) == {"t2v": 0, "i2v": 1, "flf": 2}[mode]
        assert all(name.startswith("jobs/") for name in loads)


def test_progress_counts_the_steps_of_both_experts(
    client: httpx.Client, standin: StandinProcess
) -> None:
    standin.configure(step_delay_s=0.1)
    job = client.post("/v1/jobs", json={"input": {"prompt": "p", "steps": 6, **SMALL}}).json()
    seen: list[tuple[int, int]] = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                data = json.loads(line[5:])
                progress = data.get("progress") or {}
                if progress.get("total"):
                    seen.append((progress["step"], progress["total"]))
                if data["status"] in ("succeeded", "failed", "canceled"):
                    assert data["status"] == "succeeded", data
                    break
    steps = [step for step, _ in seen]
    assert steps == sorted(steps), seen  # never goes back when the low expert starts
    assert seen[-1] == (6, 6)
    assert {total for _, total in seen} == {6}


def test_job_loras_are_downloaded_once_and_reach_comfyui(
    client: httpx.Client, standin: StandinProcess, hub: Server, tmp_path: Path
) -> None:
    url = hub.add("/loras/style.safetensors", _lora_bytes(tmp_path, 1))
    hub.add("/hub/someone/wan-loras/motion.safetensors", _lora_bytes(tmp_path, 2))
    loras = [
        {"source": url, "strength": 0.8, "applies_to": "high"},
        {"source": "hf://someone/wan-loras/motion.safetensors", "applies_to": "both"},
    ]
    for _ in range(2):
        job = run_waiting(
            client, {"prompt": "p", "start_image": png_data_uri(), **SMALL, "loras": loras}
        )
        assert job["status"] == "succeeded", job.get("error")
        sent = _last_prompt(standin)
        names = [
            n["inputs"]["lora_name"]
            for n in sent.values()
            if n["class_type"] == "LoraLoaderModelOnly"
        ]
        assert sum(name.startswith("cache/") for name in names) == 3  # high: 2, low: 1
        assert any(name.endswith("_style.safetensors") for name in names)
    assert len(hub.gets_of("/loras/style.safetensors")) == 1, "downloaded once, then cached"
    cached = list((standin.base_dir / "models" / "loras" / "cache").glob("*.safetensors"))
    assert len(cached) == 2


def test_the_lora_cache_stays_under_its_cap(
    client: httpx.Client, hub: Server, standin: StandinProcess, tmp_path: Path
) -> None:
    for seed in range(10, 14):
        url = hub.add(f"/loras/cap{seed}.safetensors", _lora_bytes(tmp_path, seed) + b"")
        job = run_waiting(client, {"prompt": "p", **SMALL, "loras": [{"source": url}]})
        assert job["status"] == "succeeded", job.get("error")
    cache = standin.base_dir / "models" / "loras" / "cache"
    assert sum(p.stat().st_size for p in cache.glob("*.safetensors")) <= 2_500_000
    assert any(p.name.endswith("_cap13.safetensors") for p in cache.iterdir())


@pytest.mark.parametrize(
    ("setup", "code"),
    [("missing", "lora_unavailable"), ("not_a_lora", "lora_invalid")],
)
def test_a_bad_lora_fails_the_job_before_comfyui_works(
    client: httpx.Client, hub: Server, standin: StandinProcess, setup: str, code: str
) -> None:
    if setup == "not_a_lora":
        hub.add("/loras/readme.safetensors", b"this is not a safetensors file at all")
    source = f"{hub.url}/loras/" + ("gone" if setup == "missing" else "readme") + ".safetensors"
    before = len(standin.stats()["prompts"])
    job = run_waiting(client, {"prompt": "p", **SMALL, "loras": [{"source": source}]})
    assert job["status"] == "failed"
    assert job["error"]["code"] == code, job["error"]
    assert source in job["error"]["message"] or "readme" in job["error"]["message"]
    assert len(standin.stats()["prompts"]) == before, "nothing was queued in ComfyUI"


@pytest.fixture
def expert_headers(standin: StandinProcess, tmp_path: Path) -> Iterator[None]:
    """The placed (sparse) expert files begin with a tiny A14B expert's safetensors header
    (dim 160), so the LoRA fit check has a model to read; zeros again afterwards."""
    tiny = tmp_path / "expert.safetensors"
    write_tiny("wan_a14b_dit", tiny)
    data = tiny.read_bytes()
    head = data[: 8 + int.from_bytes(data[:8], "little")]
    models = standin.base_dir / "models"
    experts = [f.path(models) for f in FILES if f.folder == "diffusion_models"]
    for path in experts:
        with path.open("r+b") as out:
            out.write(head)
    yield
    for path in experts:
        with path.open("r+b") as out:
            out.write(bytes(len(head)))


@pytest.mark.usefixtures("expert_headers")
def test_loras_that_fit_pass_the_check_in_each_format(
    client: httpx.Client, hub: Server, tmp_path: Path
) -> None:
    loras = [
        {"source": hub.add("/fit/plain.safetensors", _lora_bytes(tmp_path, 31))},
        {"source": hub.add("/fit/kohya.safetensors", _renamed_lora(tmp_path, 32, kohya))},
        {"source": hub.add("/fit/ab.safetensors", _renamed_lora(tmp_path, 33, lora_a_b))},
    ]
    for mode in ({}, {"start_image": png_data_uri()}):
        job = run_waiting(client, {"prompt": "p", **SMALL, **mode, "loras": loras})
        assert job["status"] == "succeeded", job.get("error")


@pytest.mark.usefixtures("expert_headers")
@pytest.mark.parametrize(
    ("made", "words"),
    [
        (
            "other_size",
            "'diffusion_model.blocks.0.cross_attn.k.lora_up.weight' [128, 4] and "
            "'diffusion_model.blocks.0.cross_attn.k.lora_down.weight' [4, 128] make a [128, 128] "
            "update, but the model's 'diffusion_model.blocks.0.cross_attn.k.weight' is [160, 160]",
        ),
        ("kohya_other_size", "'lora_unet_blocks_0_cross_attn_k.lora_up.weight' [128, 4]"),
        ("other_architecture", "none of its 30 tensors matches a layer of the model"),
    ],
)
def test_a_lora_that_does_not_fit_fails_the_job_before_comfyui_works(
    client: httpx.Client,
    hub: Server,
    standin: StandinProcess,
    tmp_path: Path,
    made: str,
    words: str,
) -> None:
    data = {
        "other_size": lambda: _lora_bytes_of(tmp_path, "wan_lora_128"),
        "kohya_other_size": lambda: _renamed_lora(tmp_path, 41, kohya, "wan_lora_128"),
        "other_architecture": lambda: _renamed_lora(tmp_path, 42, other_architecture),
    }[made]()
    source = hub.add(f"/misfit/{made}.safetensors", data)
    before = len(standin.stats()["prompts"])
    job = run_waiting(
        client,
        {"prompt": "p", **SMALL, "loras": [{"source": source, "applies_to": "high"}]},
    )
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "lora_invalid", error
    assert error["field"] == "input.loras[0].source"
    assert words in error["message"], error["message"]
    assert error["model_file"] == "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    assert "use one trained for Wan2.2 A14B" in error["message"]
    assert len(standin.stats()["prompts"]) == before, "nothing was queued in ComfyUI"


def _lora_bytes_of(tmp: Path, kind: str) -> bytes:
    path = tmp / f"{kind}.safetensors"
    write_tiny(kind, path)
    return path.read_bytes()


def test_the_distill_pair_is_fetched_into_the_cache_and_replaces_the_built_in_one(
    client: httpx.Client, standin: StandinProcess, hub: Server, tmp_path: Path
) -> None:
    for expert, seed in (("high", 61), ("low", 62)):
        name = f"wan2.2_i2v_A14b_{expert}_noise_lora_rank64_lightx2v_4step_1022.safetensors"
        hub.add(f"/hub/lightx2v/Wan2.2-Distill-Loras/{name}", _lora_bytes(tmp_path, seed))
    payload = {"prompt": "p", "start_image": png_data_uri(), **SMALL, "lightning_loras": "distill"}
    job = run_waiting(client, payload)
    assert job["status"] == "succeeded", job.get("error")
    names = [
        n["inputs"]["lora_name"]
        for n in _last_prompt(standin).values()
        if n["class_type"] == "LoraLoaderModelOnly"
    ]
    assert len(names) == 2
    assert all(name.startswith("cache/") and "4step_1022" in name for name in names)
    assert not any("lightx2v_4steps_lora_v1" in name for name in names)


def test_legacy_generate(client: httpx.Client) -> None:
    body = {"image_url": png_data_uri(), "prompt": "p", "width": 64, "height": 64, "frames": 9}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get(f"/status/{job_id}").json()
        if status["status"] in ("completed", "error"):
            break
        time.sleep(0.1)
    assert status["status"] == "completed", status
    video = client.get(f"/download/{job_id}")
    assert video.status_code == 200
    assert video.content[4:8] == b"ftyp"


def test_travel_legs_go_first_to_last_frame_and_cross_fade(client: httpx.Client) -> None:
    """N images: N-1 first-last-frame legs, each from image i to image i+1; the final mp4
    passes through every image, with each join cross-faded over the overlap."""
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    overlap = 2
    body = {
        "input": {**SMALL, "prompt": "p", "seed": 1},
        "images": [png_data_uri(c) for c in colours],
        "overlap": overlap,
        "webhook_events": ["succeeded"],
    }
    response = client.post("/v1/travels", json=body, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    travel = response.json()
    assert travel["status"] == "succeeded", travel
    assert len(travel["parts"]) == 2
    legs = [client.get(f"/v1/jobs/{part['id']}").json() for part in travel["parts"]]
    assert {leg["info"]["workflow"] for leg in legs} == {"flf"}
    assert [leg["seed"] for leg in legs] == [1, 2]
    url = next(out["url"] for out in travel["outputs"] if out["name"] == "video.mp4")
    with av.open(io.BytesIO(client.get(url).content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames_per_leg = SMALL["num_frames"]
    assert len(frames) == 2 * frames_per_leg - overlap
    # the stand-in's first-last-frame frames blend linearly from start to end image
    n = frames_per_leg - 1
    c = [np.array(colour, dtype=np.float64) for colour in colours]
    leg0 = [c[0] * (1 - i / n) + c[1] * (i / n) for i in range(frames_per_leg)]
    leg1 = [c[1] * (1 - i / n) + c[2] * (i / n) for i in range(frames_per_leg)]
    join = frames_per_leg - overlap
    expected = leg0[:join]
    for j in range(overlap):
        w = (j + 1) / (overlap + 1)
        expected.append((1 - w) * leg0[join + j] + w * leg1[j])
    expected += leg1[overlap:]
    centre = [f[24:40, 24:40].reshape(-1, 3).mean(axis=0) for f in frames]
    errors = [float(np.abs(got - want).max()) for got, want in zip(centre, expected, strict=True)]
    assert max(errors) < 8, errors


def _blend(a: Any, b: Any, i: int, n: int) -> Any:
    """Frame i of the stand-in's first-last-frame part of n frames from colour a to b."""
    return np.asarray(a, dtype=np.float64) * (1 - i / (n - 1)) + np.asarray(b) * (i / (n - 1))


def _worst(got: list[Any], want: list[Any]) -> float:
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))


def test_join_puts_a_first_last_frame_bridge_between_clips(client: httpx.Client) -> None:
    """Issue 27: clips A and B, a bridge of 5 new frames from A's last frame to B's first
    (generated as 9 frames, the next 4n+1, inner frames 1, 3, 4, 5, 7 kept); the video:
    A, the bridge, B = 9 + 5 + 9 frames; the clips' frames as they were (re-encoded)."""
    reds = [(250 - 12 * i, 20, 20) for i in range(9)]
    blues = [(20, 20, 130 + 12 * i) for i in range(9)]
    clips = [mp4_bytes(reds), mp4_bytes(blues)]
    body = {
        "input": {"prompt": "p", "seed": 5},
        "clips": [data_uri(clip, "video/mp4") for clip in clips],
        "bridge_frames": 5,
        "prompt": "a smooth pan",
    }
    response = client.post("/v1/joins", json=body, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    join = response.json()
    assert (join["kind"], join["status"]) == ("join", "succeeded"), join
    assert join["input"]["clips"][0].endswith("chars)")  # shown shortened
    (part,) = [client.get(f"/v1/jobs/{p['id']}").json() for p in join["parts"]]
    assert part["info"]["workflow"] == "flf"
    assert {k: part["input"][k] for k in ("width", "height", "num_frames", "fps", "prompt")} == {
        "width": 64,
        "height": 64,
        "num_frames": 9,
        "fps": 8,
        "prompt": "a smooth pan",
    }
    assert part["seed"] == 5
    info = join["info"]
    assert (info["frames"], info["new_frames"], info["generated_frames"]) == (23, 5, 9)
    url = next(out["url"] for out in join["outputs"] if out["name"] == "video.mp4")
    got = frame_colours(client.get(url).content)
    assert len(got) == 23
    a, b = frame_colours(clips[0]), frame_colours(clips[1])
    bridge = [_blend(a[-1], b[0], i, 9) for i in (1, 3, 4, 5, 7)]
    assert _worst(got[:9], a) < 4
    assert _worst(got[14:], b) < 4
    assert _worst(got[9:14], bridge) < 8


def test_redo_makes_a_stretch_again_and_keeps_the_rest_and_the_sound(
    client: httpx.Client,
) -> None:
    """Frames 5..9 of a 17-frame video made again from frame 4 to frame 10 (7 frames
    wanted: generated as 9, inner 1, 3, 4, 5, 7); frame count, fps and audio kept."""
    greys = [(20 + 12 * i, 20 + 12 * i, 20 + 12 * i) for i in range(17)]
    video = mp4_bytes(greys, tone_hz=440)
    body = {
        "input": {"prompt": "p"},
        "video": data_uri(video, "video/mp4"),
        "start_frame": 5,
        "end_frame": 9,
        "prompt": "it turns",
    }
    response = client.post("/v1/redos", json=body, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    redo = response.json()
    assert (redo["kind"], redo["status"]) == ("redo", "succeeded"), redo
    assert redo["info"]["stretch"] == [5, 9]
    url = next(out["url"] for out in redo["outputs"] if out["name"] == "video.mp4")
    data = client.get(url).content
    assert video_facts(data) == {**video_facts(video), "codec": "h264"}
    got, original = frame_colours(data), frame_colours(video)
    assert _worst(got[:5], original[:5]) < 4
    assert _worst(got[10:], original[10:]) < 4
    stretch = [_blend(original[4], original[10], i, 9) for i in (1, 3, 4, 5, 7)]
    assert _worst(got[5:10], stretch) < 8

    def sound(blob: bytes) -> list[bytes]:
        with av.open(io.BytesIO(blob)) as container:
            return [bytes(p) for p in container.demux(audio=0) if p.size]

    assert sound(data) == sound(video)  # the video's own audio, copied


def test_a_join_whose_bridge_failed_is_retried_and_then_made(
    client: httpx.Client, standin: StandinProcess
) -> None:
    """A failed bridge fails the join (the other kept); POST /v1/jobs/{id}/retry runs the
    failed parts again and the join is made."""
    clips = [mp4_bytes([colour] * 5) for colour in ((200, 9, 9), (9, 200, 9), (9, 9, 200))]
    standin.configure(fail_nodes={"VAEDecode": {"message": "bad latent"}})
    body = {"input": {"prompt": "p"}, "clips": [data_uri(c, "video/mp4") for c in clips]}
    body["bridge_frames"] = 3
    join = client.post("/v1/joins", json=body, headers={"Prefer": "wait=60"}).json()
    assert join["status"] == "failed", join
    assert join["error"]["code"] == "part_failed"
    standin.configure(reset=True)
    retried = client.post(f"/v1/jobs/{join['id']}/retry")
    assert retried.status_code == 200, retried.text
    done = wait_status(client, join["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["info"]["frames"] == 3 * 5 + 2 * 3
    assert [part["status"] for part in done["parts"]] == ["succeeded", "succeeded"]


def test_in_a_fleet_a_joins_bridges_run_on_both_pods_and_a_redo_anywhere(
    standin: StandinProcess, tmp_path: Path
) -> None:
    """Two Wan2.2-14B pods (each with its own ComfyUI) on one Redis: a join's bridges run
    on both at once, its clips (the parent's own files) reach the pod that joins them,
    and the join is made once; a redo sent to one pod is read back from the other."""
    with (
        StandinProcess(tmp_path / "comfy-b") as standin_b,
        RedisServer(tmp_path / "redis") as redis,
    ):
        place_sparse_models(standin_b.base_dir / "models", FILES)
        pods = []
        for name, backend in (("a", standin), ("b", standin_b)):
            backend.configure(reset=True, slow_nodes={"WanFirstLastFrameToVideo": 1.0})
            pod = ServiceProcess(
                "model_service.cli",
                tmp_path / name,
                env={
                    "COMFYUI_URL": backend.url,
                    "MODELS_DIR": str(backend.base_dir / "models"),
                    "QUEUE_URL": redis.url,
                    "QUEUE_HEARTBEAT_S": "3",
                },
                args=["serve", "wan2.2-14b-loras-v1"],
            )
            pod.env["POD_URL"] = pod.url
            pods.append(pod.start(timeout=60))
        a, b = pods
        try:
            with a.client() as on_a, b.client() as on_b:
                clips = [mp4_bytes([c] * 5) for c in ((200, 9, 9), (9, 200, 9), (9, 9, 200))]
                body = {
                    "input": {"prompt": "p"},
                    "clips": [data_uri(c, "video/mp4") for c in clips],
                    "bridge_frames": 3,
                }
                job_id = on_a.post("/v1/joins", json=body).json()["id"]
                join = wait_status(on_b, job_id, {"succeeded", "failed"}, timeout=120)
                assert join["status"] == "succeeded", join
                makers = {part["video"].split("/v1/")[0] for part in join["parts"]}
                assert makers == {a.url, b.url}, "both pods made a bridge"
                url = next(o["url"] for o in join["outputs"] if o["name"] == "video.mp4")
                assert len(frame_colours(on_b.get(url, follow_redirects=True).content)) == 21
                composed = [
                    "long video composed" in line and job_id in line
                    for pod in pods
                    for line in pod.log().splitlines()
                ]
                assert sum(composed) == 1

                video = mp4_bytes([(90, 90, 90)] * 9)
                body = {
                    "input": {"prompt": "p"},
                    "video": data_uri(video, "video/mp4"),
                    "start_frame": 2,
                    "end_frame": 4,
                }
                job_id = on_b.post("/v1/redos", json=body).json()["id"]
                redo = wait_status(on_a, job_id, {"succeeded", "failed"}, timeout=120)
                assert redo["status"] == "succeeded", redo
                url = next(o["url"] for o in redo["outputs"] if o["name"] == "video.mp4")
                assert len(frame_colours(on_a.get(url, follow_redirects=True).content)) == 9
        finally:
            for pod in pods:
                pod.stop()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"start_frame": 6, "end_frame": 5}, "end_frame", "before start_frame"),
        ({"end_frame": 8}, "end_frame", "at most 7"),
        ({"input": {"prompt": "p", "start_image": "upl_x"}}, "input.start_image", "leave it out"),
    ],
)
def test_a_redo_outside_the_video_is_refused(
    client: httpx.Client, change: dict[str, Any], field: str, words: str
) -> None:
    video = mp4_bytes([(100, 100, 100)] * 9)
    body = {
        "input": {"prompt": "p"},
        "video": data_uri(video, "video/mp4"),
        "start_frame": 2,
        "end_frame": 4,
        **change,
    }
    response = client.post("/v1/redos", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_input", field)
    assert words in error["message"]


def test_clips_of_different_shapes_are_refused(client: httpx.Client) -> None:
    clips = [mp4_bytes([(9, 9, 9)] * 5), mp4_bytes([(9, 9, 9)] * 5, size=(80, 64))]
    body = {"input": {"prompt": "p"}, "clips": [data_uri(c, "video/mp4") for c in clips]}
    response = client.post("/v1/joins", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "clips[1]"
    assert "share size and frame rate" in error["message"]


# --- PROFILE=tiny on a real ComfyUI (COMFYUI_TEST_DIR) -----------------------------------


@pytest.fixture(scope="module")
def tiny_service(tiny_comfy_service: StartComfyService, hub: Server) -> ServiceProcess:
    return tiny_comfy_service("wan2.2-14b-loras-v1", {"FETCH_ALLOW_NETWORKS": "127.0.0.0/8"})


@needs_real_comfyui
def test_tiny_modes_with_loras_on_a_real_comfyui(
    tiny_service: ServiceProcess, hub: Server, tmp_path: Path
) -> None:
    high = hub.add("/tiny/high.safetensors", _lora_bytes(tmp_path, 21))
    low = hub.add("/tiny/low.safetensors", _lora_bytes(tmp_path, 22))
    loras = [{"source": high, "applies_to": "high"}, {"source": low, "applies_to": "low"}]
    size = {"width": 64, "height": 64, "num_frames": 17, "fps": 16}
    red, blue = png_data_uri((220, 20, 20)), png_data_uri((20, 20, 220))
    with tiny_service.client() as http:
        videos = {}
        for name, extra in (
            ("t2v", {}),
            ("i2v", {"start_image": red}),
            ("flf", {"start_image": red, "end_image": blue}),
            ("i2v_blue", {"start_image": blue}),
            ("i2v_plain", {"start_image": red, "loras": []}),
        ):
            payload = {"prompt": "a fox", "seed": 5, **size, "loras": loras, **extra}
            job = run_waiting(http, payload)
            assert job["status"] == "succeeded", (name, job.get("error"))
            data = http.get(job["outputs"][0]["url"]).content
            assert _video_facts(data) == ("h264", 64, 64, 17), name
            videos[name] = video_frames(data)
    assert videos["i2v"] != videos["i2v_blue"], "the start image changes the video"
    assert videos["i2v"] != videos["i2v_plain"], "the LoRAs change the video"
    assert videos["i2v"] != videos["flf"]


@needs_real_comfyui
def test_tiny_loras_that_do_not_fit_fail_on_a_real_comfyui(
    tiny_service: ServiceProcess, hub: Server, tmp_path: Path
) -> None:
    """A LoRA for another size fails before the prompt (the check reads the tiny experts);
    one the check lets through (a LoHa: matched by name only) fails from ComfyUI's own
    log: it ran the prompt without it and said `ERROR loha <weight> shape ... invalid`."""
    other_size = hub.add("/tiny/other_size.safetensors", _lora_bytes_of(tmp_path, "wan_lora_128"))
    slips = hub.add("/tiny/loha_128.safetensors", _loha_bytes(tmp_path, 51, "wan_lora_128"))
    fits = hub.add("/tiny/loha_160.safetensors", _loha_bytes(tmp_path, 52, "wan_lora"))
    size = {"width": 64, "height": 64, "num_frames": 5, "fps": 16}
    with tiny_service.client() as http:
        job = run_waiting(http, {"prompt": "a fox", **size, "loras": [{"source": other_size}]})
        assert job["status"] == "failed"
        assert job["error"]["code"] == "lora_invalid", job["error"]
        assert "model_file" in job["error"], "refused by the check, before ComfyUI"

        job = run_waiting(http, {"prompt": "a fox", **size, "loras": [{"source": fits}]})
        assert job["status"] == "succeeded", job.get("error")

        job = run_waiting(http, {"prompt": "a fox", **size, "loras": [{"source": slips}]})
        assert job["status"] == "failed", "ComfyUI ran it without the LoRA"
        error = job["error"]
        assert error["code"] == "lora_invalid", error
        assert error["field"] == "input.loras"
        assert "ERROR loha diffusion_model.blocks.0." in error["comfyui_log"][0], error
        assert "is invalid" in error["message"]
        assert "use LoRAs trained for Wan2.2 A14B" in error["message"]

        job = run_waiting(http, {"prompt": "a fox", **size, "loras": [{"source": fits}]})
        assert job["status"] == "succeeded", "the next job does not inherit the lines"


@needs_real_comfyui
def test_tiny_join_and_redo_on_a_real_comfyui(tiny_service: ServiceProcess) -> None:
    """The graphs of issue 27 through the real first-last-frame workflow: frame counts,
    and the caller's frames kept (the tiny model's own frames are noise)."""
    reds = [(220 - 10 * i, 20, 20) for i in range(9)]
    blues = [(20, 20, 140 + 10 * i) for i in range(9)]
    clips = [mp4_bytes(reds, fps=16), mp4_bytes(blues, fps=16)]
    with tiny_service.client() as http:
        body = {
            "input": {"seed": 3},
            "clips": [data_uri(clip, "video/mp4") for clip in clips],
            "bridge_frames": 3,
            "prompt": "a fox",
        }
        response = http.post("/v1/joins", json=body, headers={"Prefer": "wait=90"})
        join = response.json()
        assert join["status"] == "succeeded", join.get("error")
        got = frame_colours(http.get(join["outputs"][0]["url"]).content)
        assert len(got) == 9 + 3 + 9
        assert _worst(got[:9], frame_colours(clips[0])) < 4
        assert _worst(got[12:], frame_colours(clips[1])) < 4
        # the bridge's own log: ComfyUI's lines while its prompt ran, then the service's
        log = http.get(f"/v1/jobs/{join['parts'][0]['id']}/logs").json()
        assert log["complete"], log
        comfy = [line for line in log["lines"] if " comfyui: " in line]
        assert comfy, log["lines"]  # (its `Prompt executed in` may come after the end)
        assert any("job finished status=succeeded" in line for line in log["lines"])

        body = {
            "input": {"seed": 3},
            "video": data_uri(clips[0], "video/mp4"),
            "start_frame": 3,
            "end_frame": 5,
            "prompt": "a fox",
        }
        response = http.post("/v1/redos", json=body, headers={"Prefer": "wait=90"})
        redo = response.json()
        assert redo["status"] == "succeeded", redo.get("error")
        got = frame_colours(http.get(redo["outputs"][0]["url"]).content)
        original = frame_colours(clips[0])
        assert len(got) == 9
        assert _worst(got[:3] + got[6:], original[:3] + original[6:]) < 4
