"""Drop-in for RunPod's worker-comfyui clients: its request shapes, taken from its own
README.md, test_input.json and tests/test_handler.py (github.com/runpod-workers/
worker-comfyui at d2a557235b3800d68dcc6fa3259125fdf4bed8a6), sent to a ComfyUI service on
the stand-in ComfyUI through the runpod SDK's local API (MODE=serverless, --rp_serve_api)
and through POST /v1/compat/worker-comfyui/runsync (also with the runpod SDK's own
endpoint client), and its BUCKET_* variables against moto's S3 server."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from model_service.cli import ENTRY_POINT_GROUP, load_spec
from model_service.compat import worker_comfyui
from model_service.errors import InvalidInput
from model_service.provision import Manifest
from model_service.settings import Settings, bucket_settings
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.process import ServiceProcess, free_port

SERVICE = "fastwan2.2-5b-packed"
OPEN = {"ALLOW_CUSTOM_WORKFLOWS": "1", "CANCEL_GRACE_S": "3"}
# the checkpoint test_input.json loads; the stand-in lists it (its nodes are fakes)
CHECKPOINT = "flux1-dev-fp8.safetensors"
LOOPBACK = ["--rp_api_host", "127.0.0.1"]
Send = Callable[[dict[str, Any]], dict[str, Any]]  # a job's input -> RunPod's answer

# test_input.json (the README's "test input"), verbatim but for the prompt text, shortened
TEST_INPUT: dict[str, Any] = {
    "input": {
        "images": [
            {
                "name": "test.png",
                "image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAM"
                "klEQVR4nGI5ZdXAQEvARFPTRy0YtWDUglELRi0YtWDUglELRi0YtWDUAioCQAAAAP//E24Bx3jUKuY"
                "AAAAASUVORK5CYII=",
            }
        ],
        "workflow": {
            "6": {
                "inputs": {"text": "anime cat with massive fluffy fennec ears", "clip": ["30", 1]},
                "class_type": "CLIPTextEncode",
                "_meta": {"title": "CLIP Text Encode (Positive Prompt)"},
            },
            "8": {
                "inputs": {"samples": ["31", 0], "vae": ["30", 2]},
                "class_type": "VAEDecode",
                "_meta": {"title": "VAE Decode"},
            },
            "9": {
                "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
                "class_type": "SaveImage",
                "_meta": {"title": "Save Image"},
            },
            "27": {
                "inputs": {"width": 512, "height": 512, "batch_size": 1},
                "class_type": "EmptySD3LatentImage",
                "_meta": {"title": "EmptySD3LatentImage"},
            },
            "30": {
                "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"},
                "class_type": "CheckpointLoaderSimple",
                "_meta": {"title": "Load Checkpoint"},
            },
            "31": {
                "inputs": {
                    "seed": 243057879077961,
                    "steps": 10,
                    "cfg": 1,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                    "denoise": 1,
                    "model": ["30", 0],
                    "positive": ["35", 0],
                    "negative": ["33", 0],
                    "latent_image": ["27", 0],
                },
                "class_type": "KSampler",
                "_meta": {"title": "KSampler"},
            },
            "33": {
                "inputs": {"text": "", "clip": ["30", 1]},
                "class_type": "CLIPTextEncode",
                "_meta": {"title": "CLIP Text Encode (Negative Prompt)"},
            },
            "35": {
                "inputs": {"guidance": 3.5, "conditioning": ["6", 0]},
                "class_type": "FluxGuidance",
                "_meta": {"title": "FluxGuidance"},
            },
            "38": {
                "inputs": {"images": ["8", 0]},
                "class_type": "PreviewImage",
                "_meta": {"title": "Preview Image"},
            },
            "40": {
                "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
                "class_type": "SaveImage",
                "_meta": {"title": "Save Image"},
            },
        },
    }
}

# README.md "API Specification > Input", verbatim: one node, and a base64 cut short
README_INPUT: dict[str, Any] = {
    "input": {
        "workflow": {
            "6": {
                "inputs": {"text": "a ball on the table", "clip": ["30", 1]},
                "class_type": "CLIPTextEncode",
                "_meta": {"title": "CLIP Text Encode (Positive Prompt)"},
            }
        },
        "images": [{"name": "input_image_1.png", "image": "data:image/png;base64,iVBOR..."}],
    }
}


def photo() -> Image.Image:
    ramp = np.arange(48, dtype=np.uint8) * 5
    x, y = np.meshgrid(ramp, ramp[:32])
    return Image.fromarray(np.stack([x, y, np.full_like(x, 60)], axis=-1))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def invert_workflow(name: str = "input_image_1.png") -> dict[str, Any]:
    """The README's shape with a graph that runs: its image loaded, inverted, saved."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }


def decoded(item: dict[str, Any]) -> Image.Image:
    assert item["type"] == "base64", item
    return Image.open(io.BytesIO(base64.b64decode(item["data"], validate=True)))


def assert_inverted(image: Image.Image) -> None:
    got = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(got - (255 - np.asarray(photo(), dtype=np.int16))).max() <= 1


# --- the translation, in-process -------------------------------------------------------


def test_only_a_workflow_without_files_is_worker_comfyuis() -> None:
    assert worker_comfyui.is_request(TEST_INPUT["input"])
    assert worker_comfyui.is_request({"workflow": {"key": "value"}})  # test_handler.py
    assert not worker_comfyui.is_request({"workflow": {}, "files": {}})  # ours
    assert not worker_comfyui.is_request({"prompt": "a cat"})  # a service's typed input
    as_text = worker_comfyui.parsed('{"workflow": {"key": "value"}}')  # test_handler.py
    assert worker_comfyui.is_request(as_text)
    assert worker_comfyui.parsed("invalid json") == "invalid json"


def test_images_become_files_and_unused_ones_are_dropped() -> None:
    data = base64.b64encode(png(photo())).decode()
    request = {
        "workflow": invert_workflow("a.png"),
        "images": [{"name": "a.png", "image": data}, *TEST_INPUT["input"]["images"]],
    }
    custom = worker_comfyui.to_custom_input(request)
    assert custom["workflow"] == request["workflow"]
    assert custom["files"] == {"a.png": f"data:application/octet-stream;base64,{data}"}
    # test_input.json's test.png: no node reads it (worker-comfyui uploads it anyway)
    assert worker_comfyui.to_custom_input(TEST_INPUT["input"])["files"] == {}


@pytest.mark.parametrize(
    ("request_input", "field"),
    [
        ({"workflow": {}, "images": [{"name": "image1.png"}]}, "input.images.0"),  # handler test
        ({"workflow": {}, "images": "x.png"}, "input.images"),
        (
            {"workflow": {}, "images": [{"name": "a", "image": ""}, {"name": "a", "image": ""}]},
            "input.images.1.name",
        ),
        ({"workflow": {}, "images": [{"name": "in/x.png", "image": ""}]}, "input.images.0.name"),
        ({"workflow": {}, "comfy_org_api_key": "key"}, "input.comfy_org_api_key"),
        ({"workflow": {}, "webhook": "https://x"}, "input.webhook"),
    ],
    ids=["image-without-data", "not-a-list", "twice", "folder", "api-nodes", "unknown-key"],
)
def test_bad_worker_comfyui_input_names_the_field(request_input: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        worker_comfyui.to_custom_input(request_input)
    assert caught.value.details["field"] == field


def test_a_failure_is_its_error_string_with_details() -> None:
    error = {
        "code": "invalid_input",
        "message": "input.workflow.2: no such node class",
        "problems": [{"field": "input.workflow.2", "message": "no such node class"}],
    }
    assert worker_comfyui.failure(error, refresh_worker=True) == {
        "error": "invalid_input: input.workflow.2: no such node class",
        "details": ["input.workflow.2: no such node class"],
        "refresh_worker": True,
    }


def test_bucket_variables_are_the_s3_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/configuration.md's example endpoint: the bucket is in the host name
    aws = bucket_settings("https://my-bucket.s3.eu-west-1.amazonaws.com")
    assert aws == {
        "s3_bucket": "my-bucket",
        "s3_region": "eu-west-1",
        "s3_prefix": "",
        "s3_presign_s": 604800,
    }
    other = bucket_settings("http://minio:9000/outputs")
    assert other["s3_endpoint_url"] == "http://minio:9000"
    assert other["s3_bucket"] == "outputs"
    for name in list(os.environ):
        if name.startswith(("S3_", "BUCKET_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://my-bucket.s3.eu-west-1.amazonaws.com")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("S3_PRESIGN_S", "60")  # ours, set: it wins
    settings = Settings()
    assert (settings.s3_bucket, settings.s3_region, settings.s3_presign_s) == (
        "my-bucket",
        "eu-west-1",
        60,
    )
    assert "s3cr3t-value" in settings.secret_values()  # kept out of the logs
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://abc.r2.cloudflarestorage.com")
    with pytest.raises(ValueError, match="names no bucket"):
        Settings()
    monkeypatch.setenv("S3_BUCKET", "outputs")
    assert Settings().s3_endpoint_url == "https://abc.r2.cloudflarestorage.com"


# --- a ComfyUI service on the stand-in: serverless (runpod SDK) and HTTP ----------------


def models() -> dict[str, list[str]]:
    spec = load_spec(SERVICE)
    assert spec.comfy is not None
    found: dict[str, list[str]] = {"checkpoints": [CHECKPOINT]}
    for file in Manifest.load(spec.comfy.manifest).files:
        found.setdefault(file.folder, []).append(file.name)
    return found


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinProcess]:
    with StandinProcess(tmp_path_factory.mktemp("wc") / "comfy", models=models()) as process:
        yield process


def serverless_worker(root: Path, standin: StandinProcess, env: dict[str, str]) -> ServiceProcess:
    """`model-service serve` with MODE=serverless and the SDK's local API (`/runsync`,
    `/run`, `/status`; no /health, so /openapi.json tells it is up)."""
    port = free_port()
    process = ServiceProcess(
        "model_service.cli",
        root / "data",
        args=["serve", SERVICE, "--rp_serve_api", "--rp_api_port", str(port), *LOOPBACK],
    )
    # no RunPod variables of this machine's, and no AWS_* keys: BUCKET_* must be enough
    process.env = {
        **{k: v for k, v in process.env.items() if not k.startswith(("RUNPOD_", "AWS_"))},
        "MODE": "serverless",
        "COMFYUI_URL": standin.url,
        "RUNPOD_SKIP_GPU_CHECK": "true",
        **OPEN,
        **env,
    }
    process.url = f"http://127.0.0.1:{port}"
    with process.log_path.open("ab") as log:
        process.proc = subprocess.Popen(
            [sys.executable, "-m", process.module, *process.args],
            env=process.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process.wait_for("/openapi.json", 90)
    return process


@pytest.fixture(scope="module")
def runpod_local(
    standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    process = serverless_worker(tmp_path_factory.mktemp("serverless"), standin, {})
    try:
        with httpx.Client(base_url=process.url, timeout=90) as client:
            yield client
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http_service(
    standin: StandinProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        "model_service.cli",
        tmp_path_factory.mktemp("http") / "data",
        env={"COMFYUI_URL": standin.url, **OPEN},
        args=["serve", SERVICE],
    )
    process.start(timeout=60)
    yield process
    process.stop()


@pytest.fixture(params=["serverless", "http"])
def send(request: pytest.FixtureRequest) -> Send:
    """RunPod's `/runsync` answer for a job's input: from the SDK's local API, or from our
    HTTP route (whose bad-input 422 is turned into RunPod's FAILED for comparison)."""
    if request.param == "serverless":
        client = request.getfixturevalue("runpod_local")

        def via_sdk(job_input: dict[str, Any]) -> dict[str, Any]:
            body: dict[str, Any] = client.post("/runsync", json={"input": job_input}).json()
            return body

        return via_sdk
    service = request.getfixturevalue("http_service")

    def via_http(job_input: dict[str, Any]) -> dict[str, Any]:
        with service.client() as client:
            response = client.post(f"{worker_comfyui.ROUTE}/runsync", json={"input": job_input})
        if response.status_code == 422:
            error = response.json()["error"]
            return {"status": "FAILED", "error": f"{error['code']}: {error['message']}"}
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    return via_http


def test_test_input_json_runs_unchanged(send: Send) -> None:
    body = send(TEST_INPUT["input"])
    assert body["status"] == "COMPLETED", body
    output = body["output"]
    assert set(output) == {"images"}  # no `errors`
    # its two SaveImage nodes; the PreviewImage (a temp file) left out, as worker-comfyui does
    assert sorted(item["filename"] for item in output["images"]) == ["node40.png", "node9.png"]
    for item in output["images"]:
        assert decoded(item).size == (512, 512)


@pytest.mark.parametrize("encoding", ["data-uri", "plain-base64"])
def test_an_input_image_by_its_name(send: Send, encoding: str) -> None:
    data = base64.b64encode(png(photo())).decode()
    image = f"data:image/png;base64,{data}" if encoding == "data-uri" else data
    job_input = {
        "workflow": invert_workflow(),
        "images": [{"name": "input_image_1.png", "image": image}],
    }
    body = send(job_input)
    assert body["status"] == "COMPLETED", body
    [item] = body["output"]["images"]
    assert item["filename"] == "node3.png"
    assert_inverted(decoded(item))


def test_the_readme_example_fails_naming_its_dangling_link(send: Send) -> None:
    body = send(README_INPUT["input"])  # node 6 links to node 30, which it leaves out
    assert body["status"] == "FAILED", body
    assert body["error"].startswith("invalid_input: input.workflow.6.inputs.clip: ")
    assert "links to node 30" in body["error"]


def test_a_run_that_fails_is_runpods_failed(send: Send, standin: StandinProcess) -> None:
    oom = {"exception_type": "torch.OutOfMemoryError", "message": "CUDA out of memory"}
    standin.configure(fail_nodes={"ImageInvert": oom})
    data = base64.b64encode(png(photo())).decode()
    try:
        body = send(
            {
                "workflow": invert_workflow(),
                "images": [{"name": "input_image_1.png", "image": data}],
            }
        )
    finally:
        standin.configure(reset=True)
    assert body["status"] == "FAILED", body
    assert body["error"].startswith("out_of_memory: "), body


def test_a_workflow_without_saved_images(send: Send) -> None:
    empty = {"width": 8, "height": 8, "batch_size": 1, "color": 0}
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    body = send({"workflow": graph})
    assert body["status"] == "COMPLETED", body
    assert body["output"] == {"status": "success_no_images", "images": []}


def test_input_as_a_json_string(http_service: ServiceProcess) -> None:
    """worker-comfyui's handler parses a string input as JSON (the SDK's local API takes
    only objects: our HTTP route stands in for RunPod's, which passes it on)."""
    data = base64.b64encode(png(photo())).decode()
    images = [{"name": "p.png", "image": data}]
    text = json.dumps({"workflow": invert_workflow("p.png"), "images": images})
    with http_service.client() as client:
        body = client.post(f"{worker_comfyui.ROUTE}/runsync", json={"input": text}).json()
    assert body["status"] == "COMPLETED", body
    assert_inverted(decoded(body["output"]["images"][0]))


def test_our_own_custom_input_keeps_its_answer_in_serverless_mode(
    runpod_local: httpx.Client,
) -> None:
    uri = f"data:image/png;base64,{base64.b64encode(png(photo())).decode()}"
    job_input = {"workflow": invert_workflow("p.png"), "files": {"p.png": uri}}
    body = runpod_local.post("/runsync", json={"input": job_input}).json()
    assert body["status"] == "COMPLETED", body
    assert body["output"]["status"] == "succeeded"
    [output] = body["output"]["outputs"]
    assert output["name"] == "node3.png"
    assert_inverted(Image.open(io.BytesIO(base64.b64decode(output["base64"]))))
    # and its errors keep our JSON string
    job_input = {"workflow": invert_workflow("p.png"), "files": {"p.png": uri}, "images": []}
    body = runpod_local.post("/runsync", json={"input": job_input}).json()
    assert body["status"] == "FAILED"
    assert json.loads(body["error"])["field"] == "input.images"


def test_the_jobs_route_points_worker_comfyui_images_to_files(
    http_service: ServiceProcess,
) -> None:
    body = {"input": {"workflow": invert_workflow(), "images": [{"name": "a", "image": "x"}]}}
    with http_service.client() as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["field"] == "input.images"
    assert "`files`" in error["message"]
    assert "/v1/compat/worker-comfyui/runsync" in error["message"]


def test_the_http_route_refuses_what_is_not_worker_comfyui(http_service: ServiceProcess) -> None:
    with http_service.client() as client:
        ours = {"input": {"workflow": invert_workflow(), "files": {}}}
        response = client.post(f"{worker_comfyui.ROUTE}/runsync", json=ours)
        assert response.status_code == 422
        assert "POST /v1/jobs" in response.json()["error"]["message"]
        for method in ("GET", "POST"):  # RunPod's SDK: GET; its local API: POST
            response = client.request(method, f"{worker_comfyui.ROUTE}/status/nope")
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"


def test_the_runpod_sdk_endpoint_client_against_the_http_route(
    http_service: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a worker-comfyui client runs (`runpod.Endpoint`), its base URL pointed here:
    `run_sync`, and `run` then `status`/`output` (GET /status/{id})."""
    import runpod  # type: ignore[import-untyped]

    monkeypatch.setattr(runpod, "api_key", "unused")  # the service has no API_KEYS here
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{http_service.url}/v1/compat")
    endpoint = runpod.Endpoint("worker-comfyui")
    data = base64.b64encode(png(photo())).decode()
    job_input = {
        "workflow": invert_workflow(),
        "images": [{"name": "input_image_1.png", "image": data}],
    }
    output = endpoint.run_sync({"input": job_input}, timeout=60)
    assert_inverted(decoded(output["images"][0]))
    job = endpoint.run(job_input)
    output = job.output(timeout=60)
    assert_inverted(decoded(output["images"][0]))
    assert job.status() == "COMPLETED"


# --- BUCKET_*: S3 URLs instead of base64 -------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_bucket_variables_upload_and_answer_s3_urls(
    standin: StandinProcess, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="bucket-key",
        aws_secret_access_key="bucket-secret",
    )
    s3.create_bucket(Bucket="comfy-out")
    env = {
        "BUCKET_ENDPOINT_URL": f"{s3_endpoint}/comfy-out",
        "BUCKET_ACCESS_KEY_ID": "bucket-key",
        "BUCKET_SECRET_ACCESS_KEY": "bucket-secret",
    }
    process = serverless_worker(tmp_path, standin, env)
    try:
        data = base64.b64encode(png(photo())).decode()
        job_input = {
            "workflow": invert_workflow(),
            "images": [{"name": "input_image_1.png", "image": data}],
        }
        body = httpx.post(f"{process.url}/runsync", json={"input": job_input}, timeout=90).json()
    finally:
        process.stop()
    assert body["status"] == "COMPLETED", body
    [item] = body["output"]["images"]
    assert item["filename"] == "node3.png"
    assert item["type"] == "s3_url"
    # like runpod's rp_upload: `<job id>/<file>`, a presigned GET URL
    assert item["data"].startswith(f"{s3_endpoint}/comfy-out/{body['id']}/node3.png?")
    assert "Signature=" in item["data"] or "X-Amz-Signature=" in item["data"]
    assert_inverted(Image.open(io.BytesIO(httpx.get(item["data"]).content)))
    assert s3.head_object(Bucket="comfy-out", Key=f"{body['id']}/node3.png")["ContentLength"] > 0


# --- RunPod Hub metadata (docs.runpod.io/hub/publishing-guide) ---------------------------

ROOT = Path(__file__).resolve().parents[2]
HUB_SERVICES = sorted(path.parent.parent.name for path in ROOT.glob("*/.runpod/hub.json"))
HUB_CATEGORIES = {"audio", "embedding", "language", "video", "image"}


def test_every_image_has_hub_metadata() -> None:
    services = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))  # installed
    assert services, "no services found"
    assert services == HUB_SERVICES


@pytest.mark.parametrize("service", HUB_SERVICES)
def test_hub_metadata_parses_and_names_our_settings(service: str) -> None:
    folder = ROOT / service / ".runpod"
    hub = json.loads((folder / "hub.json").read_text())
    tests = json.loads((folder / "tests.json").read_text())
    assert {"title", "description", "type", "category", "config"} <= set(hub)
    assert hub["type"] == "serverless"
    assert hub["category"] in HUB_CATEGORIES
    config = hub["config"]
    assert config["runsOn"] == "GPU"
    assert isinstance(config["containerDiskInGb"], int)
    assert config["gpuCount"] == 1
    assert config["gpuIds"]
    settings = {name.upper() for name in Settings.model_fields}
    env = {item["key"]: item for item in config["env"]}
    assert set(env) <= settings, set(env) - settings  # every variable is one of ours
    assert env["MODE"]["value"] == "serverless"
    for item in env.values():
        assert ("value" in item) != ("input" in item), item
        if "input" in item:
            assert {"name", "type", "description"} <= set(item["input"])
    assert tests["config"]["gpuCount"] == 1
    assert tests["config"]["gpuTypeId"]
    assert {item["key"] for item in tests["config"]["env"]} <= settings
    spec = load_spec(service)
    for test in tests["tests"]:
        assert test["name"]
        assert isinstance(test["timeout"], int)
        validated = spec.input_model.model_validate(test["input"])  # the service's own input
        if spec.check_input is not None:
            spec.check_input(validated, Settings())
