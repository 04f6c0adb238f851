"""The InfiniteTalk service end to end: a real service process on loopback with the
stand-in ComfyUI (a real process speaking ComfyUI's protocol; it decodes the uploaded
audio and muxes it into the mp4 as ComfyUI does) as its backend; with COMFYUI_TEST_DIR,
the real workflow on tiny weights in a real ComfyUI.

Audio files are made here with PyAV and the `wave` module: tones and noise bursts, in
several formats, rates and channel counts.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from infinitetalk.schema import InfiniteTalkInput
from infinitetalk.service import MANIFEST, TALK, fit, plan, window_seed
from model_service.comfy.workflow import sampler_steps
from model_service.provision import Manifest
from model_service.provision.manifest import HubSource
from model_service_testing.comfy_sigmas import WAN_DEFAULT_SHIFT, schedule
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.media import data_uri, video_frames
from model_service_testing.process import ServiceProcess, place_sparse_models
from model_service_testing.pytest_plugin import ProbedService, StartComfyService, StartStandin
from model_service_testing.sigma_probe import SigmaLog

FILES = Manifest.load(MANIFEST).files
SMALL = {"width": 64, "height": 64, "steps": 2}


def wav_bytes(seconds: float, rate: int = 16000, channels: int = 1, silent: bool = False) -> bytes:
    """Speech-like audio: a 220 Hz tone in bursts (or silence), 16-bit PCM."""
    t = np.arange(int(seconds * rate)) / rate
    signal = (
        0.0 if silent else 0.5 * np.sin(2 * math.pi * 220 * t) * (np.sin(2 * math.pi * 3 * t) > 0)
    )
    pcm = (np.asarray(signal) * 32767).astype("<i2") if not silent else np.zeros(len(t), "<i2")
    frames = np.repeat(pcm[:, None], channels, axis=1).tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return buffer.getvalue()


def encoded(seconds: float, container: str, codec: str, rate: int = 44100) -> bytes:
    """The same audio in another format (mp3, m4a, ...), encoded with PyAV."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        samples = np.frombuffer(wav_bytes(seconds, rate)[44:], "<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def png(size: tuple[int, int] = (48, 64), color: tuple[int, int, int] = (200, 150, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- planning and the graph (no server) ---------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "window", "frames", "windows", "first"),
    [
        (2.0, 81, 50, 1, 53),  # one window, as short as 4n+1 allows
        (3.24, 81, 81, 1, 81),
        (5.0, 81, 125, 2, 81),  # 81 + 72
        (10.0, 81, 250, 4, 81),  # 81 + 3 x 72 >= 250
        (2.0, 17, 50, 6, 17),  # 17 + 5 x 8 >= 50
    ],
)
def test_plan_follows_the_audio(
    tmp_path: Path, seconds: float, window: int, frames: int, windows: int, first: int
) -> None:
    (tmp_path / "a.wav").write_bytes(wav_bytes(seconds))
    (tmp_path / "f.png").write_bytes(png((640, 480)))
    values = {"audio": str(tmp_path / "a.wav"), "image": str(tmp_path / "f.png")}
    got = plan({**values, "window_frames": window, "resolution": "480p"})
    assert (got["frames"], got["windows"], got["window_frames"]) == (frames, windows, first)
    assert got["audio_s"] == pytest.approx(seconds, abs=0.01)
    covered = first + (windows - 1) * (first - 9)
    assert covered >= frames > covered - (first - 9) or windows == 1


def test_size_follows_the_image_within_the_pixel_budget() -> None:
    for size in ((640, 480), (480, 640), (1000, 1000), (1920, 1080)):
        width, height = fit(size, 832 * 480)
        assert width % 16 == height % 16 == 0
        assert abs(width * height / (832 * 480) - 1) < 0.1
        assert abs((width / height) / (size[0] / size[1]) - 1) < 0.1


TWO_SPEAKERS = {
    "second_audio": "jobs/b.wav",
    "second_encoder_audio": "jobs/b_for_encoder.wav",
    "mask_1": "jobs/m1.png",
    "mask_2": "jobs/m2.png",
}


def _graph(windows: int, frames: int, **extra: Any) -> dict[str, Any]:
    values = {
        "prompt": "p",
        "seed": 3,
        "steps": 4,
        "audio_scale": 1.0,
        "width": 64,
        "height": 64,
        "window_frames": 17,
        "image": "jobs/face.png",
        "audio": "jobs/speech.wav",
        "frames": frames,
        "windows": windows,
        **extra,
    }
    return TALK.build(values, tag="t")


def test_windows_are_chained_in_one_graph() -> None:
    graph = _graph(windows=3, frames=30)
    windows = [n for n, v in graph.items() if v["class_type"] == "WanInfiniteTalkToVideo"]
    assert len(windows) == 3
    assert "previous_frames" not in graph[windows[0]]["inputs"]
    for earlier, later in itertools.pairwise(windows):
        previous = graph[later]["inputs"]["previous_frames"][0]
        assert graph[previous]["class_type"] in ("ColorTransfer", "ImageBatch")
        assert graph[later]["inputs"]["start_image"] == graph[earlier]["inputs"]["start_image"]
    batches = [v for v in graph.values() if v["class_type"] == "ImageBatch"]
    assert len(batches) == 2
    trims = [v for v in graph.values() if v["class_type"] == "ImageFromBatch"]
    assert sorted(str(t["inputs"]["batch_index"]) for t in trims)[0] == "0"  # the final cut
    final = graph["19"]["inputs"]
    assert graph[final["image"][0]]["class_type"] == "ImageBatch"
    assert final["length"] == 30
    assert sampler_steps(graph) == 3 * 4  # progress counts windows and steps
    assert graph["20"]["inputs"]["audio"] == ["5", 0]
    assert graph["20"]["inputs"]["fps"] == 25.0


# --- fidelity: the template's scheduler, the authors' fresh noise per window ------------------


def test_every_window_samples_on_the_templates_schedule() -> None:
    """ComfyUI's InfiniteTalk template (comfyui-workflow-templates, video_wan2_1_infinitetalk):
    KSamplerSelect euler, BasicScheduler `normal`, 6 steps, CFGGuider 1, no shift node (the
    Wan model's default 8). `simple` would end at σ 0.616 instead of 0.060."""
    graph = _graph(windows=3, frames=30, steps=6)
    samplers = [v for v in graph.values() if v["class_type"] == "SamplerCustomAdvanced"]
    assert len(samplers) == 3
    assert not any(v["class_type"].startswith("ModelSampling") for v in graph.values())
    for sampler in samplers:
        assert graph[sampler["inputs"]["sampler"][0]]["inputs"]["sampler_name"] == "euler"
        scheduler = graph[sampler["inputs"]["sigmas"][0]]["inputs"]
        assert (scheduler["scheduler"], scheduler["steps"], scheduler["denoise"]) == (
            "normal",
            6,
            1.0,
        )
        assert graph[sampler["inputs"]["guider"][0]]["inputs"]["cfg"] == 1.0
    sigmas = schedule("normal", 6, WAN_DEFAULT_SHIFT)
    assert sigmas[-2] == pytest.approx(0.060, abs=0.001)  # the last model call: nearly clean


def test_each_window_starts_from_fresh_noise_of_the_jobs_seed() -> None:
    """InfiniteTalk (generate_infinitetalk.py) seeds once and draws new noise per clip:
    window k gets the job's seed + k - 1, so no two windows share their starting noise and
    the job stays reproducible from its one seed."""
    graph = _graph(windows=3, frames=30)
    seeds = []
    for sampler in (v for v in graph.values() if v["class_type"] == "SamplerCustomAdvanced"):
        noise = graph[sampler["inputs"]["noise"][0]]
        assert noise["class_type"] == "RandomNoise"
        seeds.append(noise["inputs"]["noise_seed"])
    assert sorted(seeds) == [3, 4, 5]
    assert window_seed(2**32 - 1, 2) == 0  # wraps within ComfyUI's seed range


def test_the_encoder_hears_the_speech_at_minus_23_lufs_the_video_keeps_the_original(
    tmp_path: Path,
) -> None:
    """InfiniteTalk's authors normalise the speech to -23 LUFS before wav2vec2
    (`loudness_norm`); the mp4's sound stays as recorded."""
    (tmp_path / "a.wav").write_bytes(wav_bytes(2.0))
    (tmp_path / "f.png").write_bytes(png((640, 480)))
    values = {"audio": str(tmp_path / "a.wav"), "image": str(tmp_path / "f.png")}
    got = plan({**values, "window_frames": 81, "resolution": "480p"})
    assert got["encoder_audio"] == str(tmp_path / "a_for_encoder.wav")
    assert got["audio_lufs"] is not None
    assert (tmp_path / "a_for_encoder.wav").is_file()
    graph = _graph(windows=1, frames=12, encoder_audio="jobs/a_for_encoder.wav")
    assert graph["6"]["inputs"]["audio"] == ["40", 0]  # the encoder's own LoadAudio
    assert graph["40"]["inputs"]["audio"] == "jobs/a_for_encoder.wav"
    assert graph["20"]["inputs"]["audio"] == ["5", 0]  # the video: the original speech
    off = plan({**values, "window_frames": 81, "resolution": "480p", "loudness_norm": False})
    assert off["encoder_audio"] == values["audio"]
    assert "audio_lufs" not in off


def test_the_second_speakers_encoder_hears_the_normalised_copy() -> None:
    two = _graph(windows=1, frames=12, **TWO_SPEAKERS)
    assert two["31"]["inputs"]["audio"] == ["35", 0]
    assert two["35"]["inputs"]["audio"] == "jobs/b_for_encoder.wav"
    assert two["34"]["inputs"]["audio2"] == ["30", 0]  # the track: the original voice


def test_the_patch_follows_the_number_of_speakers() -> None:
    """One person: the single-speaker weights; two: the multi-person ones (InfiniteTalk
    README; ComfyUI's two-speaker template loads wan2.1_infiniteTalk_multi_fp16)."""
    one = _graph(windows=1, frames=12)
    two = _graph(windows=2, frames=30, **TWO_SPEAKERS)
    patches = {
        name: [v["inputs"]["name"] for v in g.values() if v["class_type"] == "ModelPatchLoader"]
        for name, g in (("one", one), ("two", two))
    }
    assert patches == {
        "one": ["wan2.1_infiniteTalk_single_fp16.safetensors"],
        "two": ["wan2.1_infiniteTalk_multi_fp16.safetensors"],
    }
    manifest = {f.name: f for f in Manifest.load(MANIFEST).files}
    multi = manifest["wan2.1_infiniteTalk_multi_fp16.safetensors"]
    assert (multi.folder, multi.size_bytes) == ("model_patches", 5_124_439_112)
    assert multi.sha256 == "4c2486cdfb6ff9a9f27408e98e11e20619136933b20411e0c365b1e84075d195"


def test_one_window_needs_no_chain() -> None:
    graph = _graph(windows=1, frames=12, colour_correction=0.0)
    assert graph["19"]["inputs"]["image"] == ["18", 0]
    assert not any(v["class_type"] in ("ImageBatch", "ColorTransfer") for v in graph.values())


def test_every_window_is_colour_matched_to_the_face_before_the_next_continues() -> None:
    """InfiniteTalk (generate_infinitetalk.py `--color_correction_strength`, default 1.0)
    runs `match_and_blend_colors` on each decoded clip against the conditioning image
    before taking the next clip's motion frames: here ComfyUI's core ColorTransfer
    (reinhard_lab, per frame) after each window's VAEDecode, feeding the chain."""
    graph = _graph(windows=3, frames=30)
    transfers = {n: v["inputs"] for n, v in graph.items() if v["class_type"] == "ColorTransfer"}
    assert len(transfers) == 3
    decodes = {n for n, v in graph.items() if v["class_type"] == "VAEDecode"}
    for inputs in transfers.values():
        assert graph[inputs["image_target"][0]]["class_type"] == "VAEDecode"
        assert inputs["image_ref"] == ["11", 0]  # the face as loaded
        assert (inputs["method"], inputs["source_stats"], inputs["strength"]) == (
            "reinhard_lab",
            "per_frame",
            1.0,
        )
    assert {i["image_target"][0] for i in transfers.values()} == decodes
    # nothing uncorrected reaches the next window or the video
    for node in graph.values():
        for value in node["inputs"].values():
            if isinstance(value, list) and value and value[0] in decodes:
                assert node["class_type"] == "ColorTransfer"
    weaker = _graph(windows=2, frames=20, colour_correction=0.4)
    assert {
        v["inputs"]["strength"] for v in weaker.values() if v["class_type"] == "ColorTransfer"
    } == {0.4}


def test_clip_vision_features_of_the_face_reach_every_window_only_when_asked() -> None:
    """The authors feed CLIP-H features of the reference frame to every clip (`clip_fea`);
    ComfyUI's template does not. Behind `clip_vision` (default off)."""
    assert not any(v["class_type"].startswith("CLIPVision") for v in _graph(3, 30).values())
    graph = _graph(windows=3, frames=30, clip_vision=True)
    loaders = [v for v in graph.values() if v["class_type"] == "CLIPVisionLoader"]
    assert [v["inputs"]["clip_name"] for v in loaders] == ["clip_vision_h.safetensors"]
    encode = next(v["inputs"] for v in graph.values() if v["class_type"] == "CLIPVisionEncode")
    assert (encode["image"], encode["crop"]) == (["11", 0], "none")
    windows = [v for v in graph.values() if v["class_type"] == "WanInfiniteTalkToVideo"]
    assert len(windows) == 3
    for window in windows:
        assert graph[window["inputs"]["clip_vision_output"][0]]["class_type"] == "CLIPVisionEncode"
    manifest = {f.name: f for f in FILES}
    clip = manifest["clip_vision_h.safetensors"]
    assert (clip.folder, clip.size_bytes, clip.tiny) == (
        "clip_vision",
        1_264_219_396,
        "clip_vision_h",
    )
    assert clip.sha256 == "64a7ef761bfccbadbaa3da77366aac4185a6c58fa5de5f589b42a65bcc21f161"


def test_every_hub_file_is_pinned_to_a_revision() -> None:
    for entry in FILES:
        assert isinstance(entry.source, HubSource), entry.name
        assert re.fullmatch(r"[0-9a-f]{40}", entry.source.revision), entry.name


def test_two_speakers_use_the_native_two_speaker_mode() -> None:
    graph = _graph(windows=2, frames=20, **TWO_SPEAKERS)
    for node in (v for v in graph.values() if v["class_type"] == "WanInfiniteTalkToVideo"):
        inputs = node["inputs"]
        assert inputs["mode"] == "two_speakers"
        second = graph[inputs["mode.audio_encoder_output_2"][0]]
        assert second["class_type"] == "AudioEncoderEncode"
        assert graph[inputs["mode.mask_1"][0]]["inputs"]["image"] == "jobs/m1.png"
    audio = graph[graph["20"]["inputs"]["audio"][0]]
    assert audio["class_type"] == "AudioConcat"  # both voices, one after the other


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"width": 64}, "both"),
        ({"width": 100, "height": 64}, "multiple of 16"),
        ({"window_frames": 20}, "4n"),
        ({"second_audio": "x"}, "two speakers"),
        ({"steps": 1}, "greater than or equal"),
    ],
)
def test_bad_input_is_refused_with_the_reason(payload: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        InfiniteTalkInput.model_validate({"image": "i", "audio": "a", **payload})


def test_manifest_names_every_model_the_workflow_loads() -> None:
    names = {(f.folder, f.name) for f in FILES}
    assert set(TALK.model_files()) <= names
    assert all(f.tiny for f in FILES)


# --- the service against the stand-in ComfyUI ------------------------------------------


@pytest.fixture(scope="module")
def standin(comfy_standin: StartStandin) -> StandinProcess:
    process = comfy_standin()
    place_sparse_models(process.base_dir / "models", FILES)  # "downloaded"
    return process


@pytest.fixture(scope="module")
def service(standin: StandinProcess, comfy_service: StartComfyService) -> ServiceProcess:
    env = {"MODELS_DIR": str(standin.base_dir / "models"), "MAX_AUDIO_S": "8"}
    return comfy_service("infinite-talk-v1", standin, env={**env, "CANCEL_GRACE_S": "3"})


@pytest.fixture
def client(service: ServiceProcess, standin: StandinProcess) -> Iterator[httpx.Client]:
    standin.configure(reset=True)
    with service.client() as http:
        yield http


def _submit(client: httpx.Client, payload: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/jobs", json={"input": payload}, headers={"Prefer": "wait=60"})


def _talk(
    client: httpx.Client, audio: bytes, mime: str = "audio/wav", **extra: Any
) -> dict[str, Any]:
    payload = {"image": data_uri(png(), "image/png"), "audio": data_uri(audio, mime), **SMALL}
    response = _submit(client, {**payload, **extra})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    assert job["status"] == "succeeded", job.get("error")
    return job


def mp4_facts(data: bytes) -> dict[str, Any]:
    with av.open(io.BytesIO(data)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        audio = container.streams.audio[0] if container.streams.audio else None
        return {
            "video": video.codec_context.name,
            "frames": frames,
            "fps": float(video.average_rate or 0),
            "audio": audio.codec_context.name if audio else None,
            "audio_s": float(audio.duration * audio.time_base) if audio and audio.duration else 0,
        }


def test_a_talking_video_lasts_as_long_as_the_speech(client: httpx.Client) -> None:
    job = _talk(client, wav_bytes(2.0))
    facts = mp4_facts(client.get(job["outputs"][0]["url"]).content)
    assert (facts["video"], facts["frames"], facts["fps"]) == ("h264", 50, 25.0)
    assert facts["audio"] == "aac"
    assert facts["audio_s"] == pytest.approx(2.0, abs=0.1)
    assert job["info"]["derived"]["windows"] == 1
    assert job["info"]["derived"]["frames"] == 50


@pytest.mark.parametrize(
    ("audio", "mime", "seconds"),
    [
        (wav_bytes(1.2, rate=8000), "audio/wav", 1.2),
        (wav_bytes(1.2, rate=48000, channels=2), "audio/wav", 1.2),
        (wav_bytes(0.5), "audio/wav", 0.5),
        (encoded(1.0, "mp3", "libmp3lame"), "audio/mpeg", 1.0),
        (encoded(1.0, "ipod", "aac"), "audio/mp4", 1.0),
        (encoded(1.0, "flac", "flac"), "audio/flac", 1.0),
    ],
)
def test_audio_formats_rates_and_channels(
    client: httpx.Client, audio: bytes, mime: str, seconds: float
) -> None:
    job = _talk(client, audio, mime)
    assert job["info"]["derived"]["audio_s"] == pytest.approx(seconds, abs=0.06)
    facts = mp4_facts(client.get(job["outputs"][0]["url"]).content)
    assert (
        facts["frames"]
        == job["info"]["derived"]["frames"]
        == max(5, round(25 * job["info"]["derived"]["audio_s"]))
    )
    assert facts["audio"] == "aac"


@pytest.mark.parametrize(
    ("audio", "code"),
    [
        (wav_bytes(9.0), "audio_too_long"),
        (wav_bytes(1.0, silent=True), "audio_silent"),
        (b"RIFF\x00\x00\x00\x00WAVEnot really", "audio_unreadable"),
        (png(), "audio_unreadable"),
    ],
)
def test_bad_audio_gets_a_422_naming_the_problem(
    client: httpx.Client, audio: bytes, code: str
) -> None:
    payload = {"image": data_uri(png(), "image/png"), "audio": data_uri(audio, "audio/wav")}
    response = _submit(client, {**payload, **SMALL})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert "input.audio" in error["message"]


def test_long_speech_runs_as_chained_windows(client: httpx.Client, standin: StandinProcess) -> None:
    standin.configure(step_delay_s=0.02)
    job = client.post(
        "/v1/jobs",
        json={
            "input": {
                "image": data_uri(png(), "image/png"),
                "audio": data_uri(wav_bytes(2.0), "audio/wav"),
                **SMALL,
                "window_frames": 17,
            }
        },
    ).json()
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
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["info"]["derived"]["windows"] == 6
    assert seen[-1] == (12, 12)  # 6 windows x 2 steps
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
    facts = mp4_facts(client.get(done["outputs"][0]["url"]).content)
    assert facts["frames"] == 50
    sent = standin.stats()["prompts"][-1]
    assert sum(n["class_type"] == "WanInfiniteTalkToVideo" for n in sent.values()) == 6


def _gradient_face() -> bytes:
    x = np.linspace(0, 1, 64)[None, :, None]
    y = np.linspace(0, 1, 64)[:, None, None]
    pixels = 60 + 140 * (0.6 * x + 0.4 * y) * np.array([1.0, 0.8, 0.6])
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _colour_error(frame: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> float:
    """The largest per-channel difference of mean colour, outside the index corner."""
    difference = frame[16:, 16:].astype(np.float64) - reference[16:, 16:]
    return float(np.abs(difference.mean(axis=(0, 1))).max())


def test_colour_drift_is_pulled_back_to_the_face_in_every_window(
    client: httpx.Client, standin: StandinProcess
) -> None:
    """The stand-in's frames drift in colour over each window (redder, more saturated,
    brighter); with colour correction (the default) the video keeps the face's colours."""
    standin.configure(drift=0.6)
    face = _gradient_face()
    reference = np.asarray(Image.open(io.BytesIO(face)).convert("RGB"), dtype=np.float64)
    errors = {}
    for strength in (0.0, 1.0):
        payload = {
            "image": data_uri(face, "image/png"),
            "audio": data_uri(wav_bytes(1.6), "audio/wav"),
            **SMALL,
            "window_frames": 17,
            "colour_correction": strength,
            "seed": 5,
        }
        response = _submit(client, payload)
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded", job.get("error")
        assert job["info"]["derived"]["windows"] == 4
        frames = video_frames(client.get(job["outputs"][0]["url"]).content)
        # each window's last frame (16, 24, 32): the most drifted; the corner holds the index
        errors[strength] = max(
            _colour_error(np.frombuffer(frames[i], np.uint8).reshape(64, 64, 3), reference)
            for i in (16, 24, 32)
        )
    assert errors[0.0] > 25, errors  # the drift is real
    assert errors[1.0] < errors[0.0] / 3, errors


def test_two_speakers_speak_one_after_the_other(client: httpx.Client) -> None:
    mask = data_uri(png((48, 64), (255, 255, 255)), "image/png")
    job = _talk(
        client,
        wav_bytes(1.0),
        second_audio=data_uri(wav_bytes(0.8), "audio/wav"),
        mask_1=mask,
        mask_2=mask,
    )
    assert job["info"]["derived"]["frames"] == 45
    facts = mp4_facts(client.get(job["outputs"][0]["url"]).content)
    assert facts["frames"] == 45
    assert facts["audio_s"] == pytest.approx(1.8, abs=0.1)


def test_legacy_generate(client: httpx.Client) -> None:
    body = {
        "image_url": data_uri(png(), "image/png"),
        "audio_url": data_uri(wav_bytes(1.0), "audio/wav"),
        "width": 64,
        "height": 64,
        "steps": 2,
    }
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    job = client.get(f"/v1/jobs/{job_id}", params={}).json()
    for _ in range(600):
        if job["status"] in ("succeeded", "failed"):
            break
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job.get("error")
    assert client.get(f"/download/{job_id}").content[4:8] == b"ftyp"


# --- PROFILE=tiny on a real ComfyUI (COMFYUI_TEST_DIR) -----------------------------------


@pytest.fixture(scope="module")
def tiny_service(tiny_comfy_service: StartComfyService) -> ServiceProcess:
    return tiny_comfy_service("infinite-talk-v1")


@needs_real_comfyui
def test_tiny_one_window_and_chained_windows_on_a_real_comfyui(
    tiny_service: ServiceProcess,
) -> None:
    face = data_uri(png((64, 64), (200, 150, 120)), "image/png")
    with tiny_service.client() as http:
        results = {}
        for name, seconds, window, scale, extra in (
            ("one", 0.6, 81, 1.0, {}),
            ("chained", 1.6, 17, 1.0, {}),
            ("other_audio", 0.6, 81, 4.0, {}),
            ("clip_vision", 0.6, 81, 1.0, {"clip_vision": True}),
            ("no_colour_correction", 0.6, 81, 1.0, {"colour_correction": 0.0}),
        ):
            payload = {
                "image": face,
                "audio": data_uri(wav_bytes(seconds), "audio/wav"),
                "width": 64,
                "height": 64,
                "steps": 2,
                "seed": 1,
                "window_frames": window,
                "audio_scale": scale,
                **extra,
            }
            response = _submit(http, payload)
            assert response.status_code == 200, response.text
            job = response.json()
            assert job["status"] == "succeeded", (name, job.get("error"))
            data = http.get(job["outputs"][0]["url"]).content
            facts = mp4_facts(data)
            assert facts["frames"] == round(25 * seconds), (name, facts)
            assert (facts["video"], facts["fps"], facts["audio"]) == ("h264", 25.0, "aac")
            assert facts["audio_s"] == pytest.approx(seconds, abs=0.1)
            results[name] = (job, video_frames(data))
    assert results["chained"][0]["info"]["derived"]["windows"] == 4  # 17 + 3 x 8 >= 40
    assert results["one"][1] != results["other_audio"][1], "the audio drives the video"
    assert results["one"][1] != results["clip_vision"][1], "CLIP-H features reach the model"
    assert results["one"][1] != results["no_colour_correction"][1], "ColorTransfer ran"
    left = data_uri(_half_mask(left=True), "image/png")
    right = data_uri(_half_mask(left=False), "image/png")
    with tiny_service.client() as http:
        payload = {
            "image": face,
            "audio": data_uri(wav_bytes(0.6), "audio/wav"),
            "second_audio": data_uri(wav_bytes(0.4, rate=22050), "audio/wav"),
            "mask_1": left,
            "mask_2": right,
            "width": 64,
            "height": 64,
            "steps": 2,
            "window_frames": 17,
        }
        response = _submit(http, payload)
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded", job.get("error")
        facts = mp4_facts(http.get(job["outputs"][0]["url"]).content)
        assert facts["frames"] == 25  # both voices, one after the other: 1.0 s
        assert facts["audio_s"] == pytest.approx(1.0, abs=0.1)


def _half_mask(left: bool) -> bytes:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 64) if left else (32, 0, 64, 64))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def probed(start_probed_service: Callable[[str], ProbedService]) -> ProbedService:
    return start_probed_service("infinite-talk-v1")


@needs_real_comfyui
def test_each_window_samples_the_templates_sigmas_in_a_real_comfyui(
    probed: tuple[ServiceProcess, SigmaLog],
) -> None:
    """Recorded inside ComfyUI at every model call: `normal`, 6 steps, the Wan model's
    shift 8, for each of the two windows; the last call at σ 0.060, not `simple`'s 0.616."""
    service, log = probed
    payload = {
        "image": data_uri(png((64, 64)), "image/png"),
        "audio": data_uri(wav_bytes(1.0), "audio/wav"),
        "width": 64,
        "height": 64,
        "steps": 6,
        "window_frames": 17,
        "seed": 2,
    }
    log.clear()
    with service.client() as http:
        job = _submit(http, payload).json()
    assert job["status"] == "succeeded", job.get("error")
    assert job["info"]["derived"]["windows"] == 2
    window = schedule("normal", 6, WAN_DEFAULT_SHIFT)[:-1]
    assert log.sigmas() == pytest.approx(window * 2, abs=1e-6)
    assert window[-1] == pytest.approx(0.060, abs=0.001)
