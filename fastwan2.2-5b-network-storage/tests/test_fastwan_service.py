"""The FastWan service end to end: a real service process on loopback, with the stand-in
ComfyUI (a real process speaking ComfyUI's protocol) as its backend (COMFYUI_URL).

The graph each input builds is checked directly (`TI2V.build`); that the stand-in
accepts it (ComfyUI's own validation, from a real /object_info) is checked by the jobs.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from fastwan.schema import FastWanInput
from fastwan.service import MANIFEST, TI2V
from model_service.comfy.workflow import manual_sigmas, sampler_steps
from model_service.provision import Manifest
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import png_data_uri, video_facts, video_frames
from model_service_testing.process import ServiceProcess, run_waiting, wait_status
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

FILES = Manifest.load(MANIFEST).files
MODELS = {file.folder: [file.name] for file in FILES}
SMALL = {"width": 64, "height": 64, "num_frames": 9, "fps": 8}


@pytest.fixture(scope="module")
def standin(comfy_standin: StartStandin) -> StandinProcess:
    return comfy_standin(models=MODELS)


@pytest.fixture(scope="module")
def service(standin: StandinProcess, comfy_service: StartComfyService) -> ServiceProcess:
    return comfy_service("fastwan2.2-5b-packed", standin, env={"CANCEL_GRACE_S": "3"})


@pytest.fixture
def client(service: ServiceProcess, standin: StandinProcess) -> Iterator[httpx.Client]:
    standin.configure(reset=True)
    with service.client() as http:
        yield http


# --- the graph each input builds (no server needed) ------------------------------------


def test_text_to_video_graph_has_no_start_image() -> None:
    values = FastWanInput.model_validate({"prompt": "a cat", **SMALL}).model_dump()
    graph = TI2V.build({**values, "seed": 7}, tag="job1")
    assert "56" not in graph
    assert "start_image" not in graph["55"]["inputs"]
    assert graph["6"]["inputs"]["text"] == "a cat"
    assert graph["60"]["inputs"]["noise_seed"] == 7
    assert graph["61"]["inputs"]["cfg"] == 1.0
    assert (graph["55"]["inputs"]["width"], graph["55"]["inputs"]["height"]) == (64, 64)
    assert graph["55"]["inputs"]["length"] == 9
    assert graph["57"]["inputs"]["fps"] == 8.0
    assert graph["58"]["inputs"]["filename_prefix"] == "fastwan/video_job1"


def test_image_to_video_graph_links_the_uploaded_image() -> None:
    values = FastWanInput.model_validate(
        {"prompt": "a cat", "start_image": "upl_x", "preset": "704x1280"}
    ).model_dump()
    graph = TI2V.build({**values, "start_image": "jobs/abc_start_image.png"}, tag="t")
    assert graph["56"]["inputs"]["image"] == "jobs/abc_start_image.png"
    assert graph["55"]["inputs"]["start_image"] == ["56", 0]
    assert (graph["55"]["inputs"]["width"], graph["55"]["inputs"]["height"]) == (704, 1280)
    assert TI2V.graph["55"]["inputs"]["start_image"] == ["56", 0]  # the template is untouched


# --- fidelity: the sampling FastVideo distilled the model for ------------------------------
# FastVideo (hao-ai-lab/FastVideo) fastvideo/configs/pipelines/wan.py FastWan2_2_TI2V_5B_Config:
# dmd_denoising_steps [1000, 757, 522]; DmdDenoisingStage predicts x0 and re-noises it with
# fresh noise to the next timestep (scheduler.add_noise), timestep = σ x 1000. ComfyUI 0.33.0:
# SamplerCustomAdvanced + ManualSigmas + the `lcm` sampler (k_diffusion sample_lcm: x =
# denoised, then noise_scaling(σ_next, fresh noise, x)) is exactly that; cfg 1, one pass.
FASTVIDEO_TIMESTEPS = [1000, 757, 522]


def test_sampling_is_fastvideos_distilled_schedule() -> None:
    values = FastWanInput.model_validate({"prompt": "a cat", **SMALL}).model_dump()
    graph = TI2V.build({**values, "seed": 7}, tag="t")
    sampler = graph["3"]
    assert sampler["class_type"] == "SamplerCustomAdvanced"
    assert graph[sampler["inputs"]["sampler"][0]]["inputs"] == {"sampler_name": "lcm"}
    sigmas_node = graph[sampler["inputs"]["sigmas"][0]]
    assert sigmas_node["class_type"] == "ManualSigmas"
    sigmas = manual_sigmas(sigmas_node["inputs"]["sigmas"])
    assert sigmas == [t / 1000 for t in FASTVIDEO_TIMESTEPS] + [0.0]
    assert sampler_steps(graph) == len(FASTVIDEO_TIMESTEPS)
    guider = graph[sampler["inputs"]["guider"][0]]
    assert (guider["class_type"], guider["inputs"]["cfg"]) == ("CFGGuider", 1.0)
    assert graph[sampler["inputs"]["noise"][0]]["class_type"] == "RandomNoise"
    # the model is the flow model (timestep = σ x 1000 in ComfyUI's ModelSamplingDiscreteFlow)
    assert graph[guider["inputs"]["model"][0]]["class_type"] == "ModelSamplingSD3"


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_other_step_counts_are_refused(steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        FastWanInput.model_validate({"prompt": "x", "steps": steps})


def test_shift_is_no_longer_an_input() -> None:
    """Manual sigmas are not moved by a flow shift: a `shift` field would do nothing."""
    with pytest.raises(ValueError, match="shift"):
        FastWanInput.model_validate({"prompt": "x", "shift": 5.0})


def test_a_portrait_start_image_makes_a_portrait_video(client: httpx.Client) -> None:
    """No size given: the video takes the image's shape at the 720p budget by Wan2.2's own
    rule (TI2V-5B `best_output_size`), not a landscape crop of a portrait photo."""
    portrait = png_data_uri(size=(480, 832))
    job = run_waiting(client, {"prompt": "p", "start_image": portrait, "num_frames": 5, "fps": 8})
    assert job["status"] == "succeeded", job.get("error")
    assert job["info"]["derived"] == {"width": 704, "height": 1248}
    facts = video_facts(client.get(job["outputs"][0]["url"]).content)
    assert (facts["width"], facts["height"]) == (704, 1248)
    given = run_waiting(client, {"prompt": "p", "start_image": portrait, **SMALL})  # a size wins
    assert "derived" not in given["info"]
    facts = video_facts(client.get(given["outputs"][0]["url"]).content)
    assert (facts["width"], facts["height"]) == (64, 64)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"prompt": "x", "num_frames": 120}, "4n+1"),
        ({"prompt": "x", "num_frames": 125}, "less than or equal to 121"),  # trained on 121
        ({"prompt": "x", "width": 100, "height": 64}, "multiple of 32"),
        ({"prompt": "x", "width": 1280, "height": 1280}, "larger than 720p"),
        ({"prompt": "x", "preset": "1280x704", "width": 64, "height": 64}, "not both"),
        ({"prompt": "x", "width": 64}, "both `width` and `height`"),
        ({"prompt": ""}, "at least 1 character"),
    ],
)
def test_bad_input_is_refused_with_the_reason(payload: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        FastWanInput.model_validate(payload)


def test_manifest_names_every_model_the_workflow_loads() -> None:
    assert sorted(TI2V.model_files()) == sorted((f.folder, f.name) for f in FILES)
    assert all(file.sha256 and file.tiny for file in FILES)
    assert sum(file.size_bytes for file in FILES) == 18_144_966_705 - 9_999_658_848 + 9_999_659_744


# --- through the service -----------------------------------------------------------------


def test_text_to_video_job_returns_an_h264_mp4(client: httpx.Client) -> None:
    job = run_waiting(client, {"prompt": "a red fox", "seed": 11, **SMALL})
    assert job["status"] == "succeeded", job.get("error")
    assert job["outputs"][0]["name"] == "video.mp4"
    assert job["info"]["workflow"] == "ti2v"
    assert job["seed"] == 11
    video = client.get(job["outputs"][0]["url"])
    assert video.status_code == 200
    facts = video_facts(video.content)
    assert facts["codec"] == "h264"
    assert (facts["width"], facts["height"], facts["frames"]) == (64, 64, 9)
    assert facts["fps"] == pytest.approx(8.0)


def test_image_to_video_uploads_the_start_image(
    client: httpx.Client, standin: StandinProcess
) -> None:
    job = run_waiting(client, {"prompt": "a red fox", "start_image": png_data_uri(), **SMALL})
    assert job["status"] == "succeeded", job
    uploaded = list((standin.base_dir / "input" / "jobs").glob("*_start_image.png"))
    assert uploaded, "the start image never reached ComfyUI's input folder"
    newest = max(uploaded, key=lambda path: path.stat().st_mtime)  # other tests upload too
    with Image.open(newest) as start:
        assert start.size == (48, 32)


def test_a_random_seed_is_chosen_and_returned(client: httpx.Client) -> None:
    first = run_waiting(client, {"prompt": "waves", **SMALL})
    second = run_waiting(client, {"prompt": "waves", **SMALL})
    assert first["status"] == second["status"] == "succeeded"
    assert isinstance(first["seed"], int)
    assert first["seed"] != second["seed"]


def test_progress_events_follow_the_sampler_steps(
    client: httpx.Client, standin: StandinProcess, service: ServiceProcess
) -> None:
    standin.configure(step_delay_s=0.2)
    job = client.post("/v1/jobs", json={"input": {"prompt": "p", **SMALL}}).json()
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
    assert (3, 3) in seen  # one step per interval of the distilled σ list
    assert any(step < total for step, total in seen), seen


def test_cancel_interrupts_only_our_prompt(client: httpx.Client, standin: StandinProcess) -> None:
    standin.configure(slow_nodes={"SamplerCustomAdvanced": 20.0})
    job = client.post("/v1/jobs", json={"input": {"prompt": "slow", **SMALL}}).json()
    wait_status(client, job["id"], {"running"}, timeout=30)
    time.sleep(0.5)  # the prompt is running inside ComfyUI
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    done = wait_status(client, job["id"], {"canceled", "failed", "succeeded"}, timeout=30)
    assert done["status"] == "canceled", done
    interrupts = standin.stats()["interrupt"]
    assert interrupts, "ComfyUI was never asked to interrupt"
    assert all(call.get("prompt_id") for call in interrupts), interrupts  # never a global one
    standin.configure(reset=True)
    assert run_waiting(client, {"prompt": "after cancel", **SMALL})["status"] == "succeeded"


def test_execution_error_names_the_node(client: httpx.Client, standin: StandinProcess) -> None:
    standin.configure(
        fail_nodes={"VAEDecode": {"exception_type": "RuntimeError", "message": "bad latent"}}
    )
    job = run_waiting(client, {"prompt": "fails", **SMALL})
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "comfy_execution_error"
    assert "VAEDecode" in error["message"]
    assert "bad latent" in error["message"]


def test_out_of_memory_has_its_own_code_and_frees_memory(
    client: httpx.Client, standin: StandinProcess
) -> None:
    standin.configure(
        fail_nodes={
            "SamplerCustomAdvanced": {"exception_type": "torch.OutOfMemoryError", "message": ""}
        }
    )
    job = run_waiting(client, {"prompt": "too big", **SMALL})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "out_of_memory"
    assert standin.stats()["free"], "ComfyUI was not asked to free its memory"


def test_legacy_routes(client: httpx.Client) -> None:
    started = client.post(
        "/generate",
        # the original wrapper's `steps` 8 (base model + LoRA) is ignored: the distilled 3 run
        json={"prompt": "legacy", "width": 64, "height": 64, "length": 9, "fps": 8, "steps": 8},
    )
    assert started.status_code == 200, started.text
    body = started.json()
    assert body["status"] == "queued"
    assert body["job_id"]
    job_id = body["job_id"]
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get(f"/status/{job_id}").json()
        if status["status"] in ("completed", "error"):
            break
        time.sleep(0.1)
    assert status["status"] == "completed", status
    assert status["video_ready"] is True
    assert status["progress"] == 100
    video = client.get(status["download_url"])
    assert video.status_code == 200
    assert f"generated_video_{job_id}.mp4" in video.headers["content-disposition"]
    assert video_facts(video.content)["frames"] == 9
    assert job_id in client.get("/jobs").json()
    assert client.delete(f"/jobs/{job_id}").status_code == 200
    assert client.get(f"/download/{job_id}").status_code == 400
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"  # record kept


def test_legacy_generate_validates_like_the_job_api(client: httpx.Client) -> None:
    response = client.post("/generate", json={"prompt": "x", "length": 10})
    assert response.status_code == 422
    assert "4n+1" in response.json()["error"]["message"]


def test_comfyui_crash_fails_the_job_and_the_next_job_succeeds(
    tmp_path: Path, service: ServiceProcess
) -> None:
    """A second service on its own stand-in, restarted on the same port after the crash."""
    base = tmp_path / "comfy"
    crashing = StandinProcess(base, models=MODELS, knobs={"crash_nodes": ["SamplerCustomAdvanced"]})
    crashing.start()
    data = tmp_path / "data"
    own = ServiceProcess(
        "model_service.cli",
        data,
        env={"COMFYUI_URL": crashing.url},
        args=["serve", "fastwan2.2-5b-packed"],
    )
    own.start(timeout=60)
    try:
        with own.client() as http:
            job = run_waiting(http, {"prompt": "boom", **SMALL})
            assert job["status"] == "failed", job
            assert job["error"]["code"] == "backend_crashed", job["error"]
            assert "Retry" in job["error"]["message"] or "retry" in job["error"]["message"]
            restarted = StandinProcess(base, models=MODELS)
            restarted.port, restarted.url = crashing.port, crashing.url
            restarted.args[1] = str(crashing.port)
            restarted.start()
            try:
                own.wait_for("/ready", 60)
                assert run_waiting(http, {"prompt": "fine", **SMALL})["status"] == "succeeded"
            finally:
                restarted.stop()
    finally:
        own.stop()
        crashing.stop()


def test_missing_model_keeps_ready_503_naming_the_file(tmp_path: Path) -> None:
    base = tmp_path / "comfy"
    partial = {folder: names for folder, names in MODELS.items() if folder != "vae"}
    with StandinProcess(base, models=partial) as comfy:
        own = ServiceProcess(
            "model_service.cli",
            tmp_path / "data",
            env={"COMFYUI_URL": comfy.url},
            args=["serve", "fastwan2.2-5b-packed"],
        )
        own.start(wait_ready=False, timeout=60)
        try:
            deadline = time.monotonic() + 30
            ready = httpx.get(own.url + "/ready")
            while "wan2.2_vae" not in ready.text and time.monotonic() < deadline:
                time.sleep(0.2)
                ready = httpx.get(own.url + "/ready")
            assert ready.status_code == 503
            assert "vae/wan2.2_vae.safetensors is missing" in ready.text, ready.text
            assert "model-service download" in ready.text
            # the file arrives (an operator copied it): ready without a restart
            (base / "models" / "vae").mkdir(parents=True, exist_ok=True)
            (base / "models" / "vae" / "wan2.2_vae.safetensors").write_bytes(b"x")
            own.wait_for("/ready", 30)
        finally:
            own.stop()


# --- PROFILE=tiny on a real ComfyUI (COMFYUI_TEST_DIR) -----------------------------------


@pytest.fixture(scope="module")
def tiny_service(tiny_comfy_service: StartComfyService) -> ServiceProcess:
    return tiny_comfy_service("fastwan2.2-5b-packed")


@needs_real_comfyui
def test_tiny_text_to_video_on_a_real_comfyui(tiny_service: ServiceProcess) -> None:
    with tiny_service.client() as http:
        job = run_waiting(http, {"prompt": "a red fox", "seed": 1, **SMALL, "num_frames": 17})
        assert job["status"] == "succeeded", job.get("error")
        video = http.get(job["outputs"][0]["url"]).content
        facts = video_facts(video)
        assert facts["codec"] == "h264"
        assert (facts["width"], facts["height"], facts["frames"]) == (64, 64, 17)
        assert facts["fps"] == pytest.approx(8.0)
        other = run_waiting(http, {"prompt": "a red fox", "seed": 2, **SMALL, "num_frames": 17})
        assert video_frames(http.get(other["outputs"][0]["url"]).content) != video_frames(video)
        ready = http.get("/ready").json()
        assert ready["ready"] is True
    # each video was moved out of the ComfyUI we launched: its output folder does not grow
    left = [p for p in (tiny_service.data_dir / "comfyui" / "output").rglob("*") if p.is_file()]
    assert left == []


@needs_real_comfyui
def test_tiny_image_to_video_on_a_real_comfyui(tiny_service: ServiceProcess) -> None:
    with tiny_service.client() as http:
        red = run_waiting(http, {"prompt": "x", "seed": 3, "start_image": png_data_uri(), **SMALL})
        blue = run_waiting(
            http,
            {"prompt": "x", "seed": 3, "start_image": png_data_uri((20, 40, 220)), **SMALL},
        )
        assert red["status"] == blue["status"] == "succeeded", (red.get("error"), blue.get("error"))
        red_frames = video_frames(http.get(red["outputs"][0]["url"]).content)
        blue_frames = video_frames(http.get(blue["outputs"][0]["url"]).content)
        assert len(red_frames) == len(blue_frames) == 9
        assert red_frames != blue_frames  # the start image reaches the model


@needs_real_comfyui
def test_tiny_chain_on_a_real_comfyui_hands_over_the_lossless_last_frame(
    tiny_service: ServiceProcess,
) -> None:
    """The last-frame nodes added for chains (ImageFromBatch -1, SaveImage) run on the real
    ComfyUI; the PNG is the mp4's last frame before encoding, and the chain stitches."""
    body = {
        "input": {"prompt": "x", "seed": 5, "start_image": png_data_uri(), **SMALL},
        "segments": [{}, {}],
        "colour_correction": True,
    }
    with tiny_service.client() as http:
        chain = http.post("/v1/chains", json=body, headers={"Prefer": "wait=90"}).json()
        assert chain["status"] == "succeeded", chain.get("error")
        assert chain["info"]["frames"] == 2 * SMALL["num_frames"] - 1
        first = http.get(f"/v1/jobs/{chain['parts'][0]['id']}").json()
        names = [out["name"] for out in first["outputs"]]
        assert "last_frame.png" in names
        png = http.get(f"/v1/jobs/{first['id']}/outputs/last_frame.png").content
        last = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
        with av.open(io.BytesIO(http.get(chain["parts"][0]["video"]).content)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        # random weights make noisy frames, every other one nearly alike, that h264 at
        # 64x64 blurs: the PNG is among the frames nearest to it (the exact hand-off is
        # checked on the stand-in, whose frames carry their index)
        distances = [float(np.abs(last - frame).mean()) for frame in decoded]
        assert last.shape == decoded[-1].shape
        assert distances[-1] <= 1.1 * min(distances), distances
    left = [p for p in (tiny_service.data_dir / "comfyui" / "output").rglob("*") if p.is_file()]
    assert left == []
