"""Custom ComfyUI workflows (ALLOW_CUSTOM_WORKFLOWS=1) on a ComfyUI service, end to end
over HTTP: weight-free graphs (an uploaded image inverted, a video built from an image
batch) on the stand-in ComfyUI, and on a real one when COMFYUI_TEST_DIR is set."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from fastwan.service import MANIFEST
from model_service.provision import Manifest
from model_service_testing import machine
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.machine import COMFYUI_TEST_DIR
from model_service_testing.process import ServiceProcess, tiny_comfy_process, wait_status

MODELS = {file.folder: [file.name] for file in Manifest.load(MANIFEST).files}
OPEN = {"ALLOW_CUSTOM_WORKFLOWS": "1", "CUSTOM_WORKFLOW_NODES_DENY": "RepeatImageBatch"}
Graph = dict[str, Any]


def invert_graph(file_name: str = "photo.png") -> Graph:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": file_name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "mine"}},
    }


def video_graph(codec_key: str, frames: int = 6) -> Graph:
    empty = {"width": 64, "height": 64, "batch_size": frames, "color": 0xC81E1E}
    save = {"video": ["2", 0], "filename_prefix": "clip", "format": "mp4", codec_key: "h264"}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "SaveVideo", "inputs": save},
    }


def photo() -> Image.Image:
    ramp = np.arange(48, dtype=np.uint8) * 5
    x, y = np.meshgrid(ramp, ramp[:32])
    return Image.fromarray(np.stack([x, y, np.full_like(x, 60)], axis=-1))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=["standin", "real"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp(f"custom-{request.param}")
    if request.param == "real":
        if not COMFYUI_TEST_DIR:
            pytest.skip(machine.WHY_NO_REAL_COMFYUI)
        process = tiny_comfy_process(root, "fastwan2.2-5b-packed", COMFYUI_TEST_DIR, env=OPEN)
        process.start(timeout=240)
        yield process
        process.stop()
        return
    with StandinProcess(root / "comfy", models=MODELS) as standin:
        process = ServiceProcess(
            "model_service.cli",
            root / "data",
            env={"COMFYUI_URL": standin.url, "CANCEL_GRACE_S": "3", **OPEN},
            args=["serve", "fastwan2.2-5b-packed"],
        )
        process.standin = standin  # type: ignore[attr-defined]
        process.start(timeout=60)
        yield process
        process.stop()


@pytest.fixture
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    standin = getattr(service, "standin", None)
    if standin is not None:
        standin.configure(reset=True)
    with service.client() as http:
        yield http


def run(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"input": body}, headers={"Prefer": "wait=60"})
    assert response.status_code in (200, 202), response.text
    return wait_status(client, response.json()["id"], {"succeeded", "failed", "canceled"}, 60)


def test_an_uploaded_image_runs_through_your_own_graph(client: httpx.Client) -> None:
    upload = client.post("/v1/uploads", files={"file": ("p.png", png(photo()), "image/png")})
    assert upload.status_code == 201, upload.text
    body = {"workflow": invert_graph(), "files": {"photo.png": upload.json()["id"]}}
    for _ in range(2):  # the same graph twice: run again, not served from ComfyUI's cache
        job = run(client, body)
        assert job["status"] == "succeeded", job["error"]
        assert job["info"]["workflow"] == "custom"
        [output] = job["outputs"]
        assert output["name"] == "node3.png"  # named after the node that saved it
        data = client.get(output["url"]).content
        inverted = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        assert np.abs(inverted - (255 - np.asarray(photo(), dtype=np.int16))).max() <= 1
    assert job["input"]["files"] == body["files"]


def test_a_video_from_an_image_batch(client: httpx.Client, service: ServiceProcess) -> None:
    job = run(client, {"workflow": video_graph(codec_key(service))})
    assert job["status"] == "succeeded", job["error"]
    [output] = job["outputs"]
    assert output["name"] == "node3.mp4"
    with av.open(io.BytesIO(client.get(output["url"]).content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6
    assert np.allclose(frames[0].reshape(-1, 3).mean(axis=0), (200, 30, 30), atol=8)


def codec_key(service: ServiceProcess) -> str:
    """0.33 has `codec` beside `format`; later versions nest it (`format.codec`)."""
    standin = getattr(service, "standin", None)
    url = standin.url if standin is not None else f"http://127.0.0.1:{service.env['COMFYUI_PORT']}"
    info = httpx.get(f"{url}/object_info/SaveVideo", timeout=10).json()["SaveVideo"]
    nested = info["input"]["required"]["format"][0] == "COMFY_DYNAMICCOMBO_V3"
    return "format.codec" if nested else "codec"


@pytest.mark.parametrize(
    ("graph", "files", "field", "words"),
    [
        (
            {**invert_graph(), "2": {"class_type": "NoSuchNode", "inputs": {}}},
            {"photo.png": "upl_x"},
            "input.workflow.2",
            "no such node class",
        ),
        (
            {**invert_graph(), "2": {"class_type": "ImageInvert", "inputs": {}}},
            {"photo.png": "upl_x"},
            "input.workflow.2.inputs.image",
            "required input 'image' missing",
        ),
        (
            {**invert_graph(), "2": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}},
            {"photo.png": "upl_x"},
            "input.workflow.2.inputs.image",
            "links to node 9",
        ),
        (invert_graph("other.png"), {}, "input.workflow.1.inputs.image", "names no file"),
        (
            {"1": invert_graph()["1"], "2": invert_graph()["2"]},
            {"photo.png": "upl_x"},
            "input.workflow",
            "no output node",
        ),
        (
            invert_graph(),
            {"photo.png": "upl_x", "extra.png": "upl_y"},
            "input.files.extra.png",
            "no loader",
        ),
        (
            {
                **invert_graph(),
                "4": {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 2}},
            },
            {"photo.png": "upl_x"},
            "input.workflow.4",
            "not allowed",
        ),
    ],
    ids=[
        "unknown-class",
        "missing-input",
        "dangling-link",
        "unknown-file",
        "no-output",
        "unused-file",
        "denied-class",
    ],
)
def test_a_bad_graph_is_refused_before_it_is_queued(
    client: httpx.Client, graph: Graph, files: dict[str, str], field: str, words: str
) -> None:
    before = client.get("/v1/jobs").json()["jobs"]
    response = client.post("/v1/jobs", json={"input": {"workflow": graph, "files": files}})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["field"] == field
    assert words in error["message"]
    assert client.get("/v1/jobs").json()["jobs"] == before  # nothing stored


def test_typed_input_keeps_its_own_errors_beside_workflows(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json={"input": {"prompt": "", "width": 64}})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "input.prompt"


def test_cancel_stops_a_custom_workflow(client: httpx.Client, service: ServiceProcess) -> None:
    standin = getattr(service, "standin", None)
    if standin is None:
        machine.skip_on_real_comfyui(
            "the stand-in's slow-node knob makes the graph run long enough"
        )
    standin.configure(slow_nodes={"EmptyImage": 5.0})
    graph = video_graph(codec_key(service), frames=5)  # (a graph of its own: not cached)
    job = client.post("/v1/jobs", json={"input": {"workflow": graph}})
    job_id = job.json()["id"]
    wait_status(client, job_id, {"running"}, 30)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert wait_status(client, job_id, {"succeeded", "failed", "canceled"}, 30)["status"] == (
        "canceled"
    )


def test_out_of_memory_in_a_custom_workflow(client: httpx.Client, service: ServiceProcess) -> None:
    standin = getattr(service, "standin", None)
    if standin is None:
        machine.skip_on_real_comfyui("the stand-in injects the failure")
    standin.configure(
        fail_nodes={"CreateVideo": {"exception_type": "torch.OutOfMemoryError", "message": ""}}
    )
    job = run(client, {"workflow": video_graph(codec_key(service), frames=7)})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "out_of_memory"


def test_off_unless_enabled(tmp_path: Path) -> None:
    with StandinProcess(tmp_path / "comfy", models=MODELS) as standin:
        process = ServiceProcess(
            "model_service.cli",
            tmp_path / "data",
            env={"COMFYUI_URL": standin.url},
            args=["serve", "fastwan2.2-5b-packed"],
        )
        process.start(timeout=60)
        try:
            with process.client() as client:
                body = {"input": {"workflow": invert_graph(), "files": {}}}
                response = client.post("/v1/jobs", json=body)
                assert response.status_code == 422
                error = response.json()["error"]
                assert error["field"] == "input.workflow"
                assert "ALLOW_CUSTOM_WORKFLOWS=1" in error["message"]
        finally:
            process.stop()


def test_timeout_and_crash_in_a_custom_workflow(tmp_path: Path) -> None:
    """JOB_TIMEOUT_S, then ComfyUI dying under the graph: the typed jobs' codes."""
    knobs = {"slow_nodes": {"EmptyImage": 20.0}, "crash_nodes": ["ImageInvert"]}
    with StandinProcess(tmp_path / "comfy", models=MODELS, knobs=knobs) as standin:
        process = ServiceProcess(
            "model_service.cli",
            tmp_path / "data",
            env={
                "COMFYUI_URL": standin.url,
                "JOB_TIMEOUT_S": "2",
                "CANCEL_GRACE_S": "2",
                **OPEN,
            },
            args=["serve", "fastwan2.2-5b-packed"],
        )
        process.start(timeout=60)
        try:
            with process.client() as client:
                slow = {"1": video_graph("codec")["1"], "2": invert_graph()["3"]}
                slow["2"]["inputs"]["images"] = ["1", 0]
                job = run(client, {"workflow": slow})
                assert job["status"] == "failed"
                assert job["error"]["code"] == "timeout"

                upload = client.post("/v1/uploads", files={"file": ("p.png", png(photo()))})
                body = {"workflow": invert_graph(), "files": {"photo.png": upload.json()["id"]}}
                job = run(client, body)
                assert job["status"] == "failed"
                assert job["error"]["code"] == "backend_crashed", job["error"]
        finally:
            process.stop()


def mp4(frames: int = 5) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(frames):
            image = np.full((64, 64, 3), (30 * index, 120, 200), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_a_video_file_goes_through_a_video_loader(
    client: httpx.Client, service: ServiceProcess
) -> None:
    upload = client.post("/v1/uploads", files={"file": ("clip.mp4", mp4(), "video/mp4")})
    assert upload.status_code == 201, upload.text
    save = {"video": ["1", 0], "filename_prefix": "again", "format": "mp4"}
    save[codec_key(service)] = "h264"
    graph = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
        "2": {"class_type": "SaveVideo", "inputs": save},
    }
    job = run(client, {"workflow": graph, "files": {"clip.mp4": upload.json()["id"]}})
    assert job["status"] == "succeeded", job["error"]
    assert [output["name"] for output in job["outputs"]] == ["node2.mp4"]

    not_a_video = client.post("/v1/uploads", files={"file": ("x.mp4", b"not a video")})
    bad = {"workflow": graph, "files": {"clip.mp4": not_a_video.json()["id"]}}
    response = client.post("/v1/jobs", json={"input": bad})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "input.files.clip.mp4"


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    import wave

    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def test_an_audio_file_goes_through_an_audio_loader(
    client: httpx.Client, service: ServiceProcess
) -> None:
    upload = client.post("/v1/uploads", files={"file": ("tone.wav", wav(), "audio/wav")})
    graph = {
        "1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}},
        "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "tone"}},
    }
    job = run(client, {"workflow": graph, "files": {"tone.wav": upload.json()["id"]}})
    assert job["status"] == "succeeded", job["error"]
    [output] = job["outputs"]
    assert output["name"].startswith("node2")
    if getattr(service, "standin", None) is not None:
        return  # the stand-in's SaveAudio is a fake: only a real ComfyUI writes the audio
    data = client.get(output["url"]).content
    with av.open(io.BytesIO(data)) as container:
        seconds = sum(frame.samples for frame in container.decode(audio=0)) / 16000
    assert abs(seconds - 1.0) < 0.1


def test_a_graph_not_in_api_format_is_refused(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json={"input": {"workflow": {"1": {"inputs": {}}}}})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "input.workflow.1.class_type"
    bad_name = {"workflow": invert_graph(), "files": {"../etc/passwd": "upl_x"}}
    response = client.post("/v1/jobs", json={"input": bad_name})
    assert response.status_code == 422
    assert response.json()["error"]["field"].startswith("input.files")
