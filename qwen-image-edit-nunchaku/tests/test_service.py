"""The Qwen-Image-Edit service over real HTTP: tiny pipeline, real worker process."""

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model_service.errors import InvalidInput
from model_service.settings import Settings
from model_service_testing.process import ServiceProcess, wait_status
from qwen_image_edit.legacy import EditImageRequest, _job_input
from qwen_image_edit.schema import QwenEditInput
from qwen_image_edit.service import SPEC


def png(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _tiny_service(root: Path, **env: str) -> ServiceProcess:
    return ServiceProcess(
        "model_service.cli",
        root / "data",
        env={"PROFILE": "tiny", "MODELS_DIR": str(root / "models"), "JOB_TIMEOUT_S": "120"} | env,
        args=["serve", "qwen-image-edit-nunchaku"],
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = _tiny_service(tmp_path_factory.mktemp("qwen"))
    process.start(timeout=300)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def lightning_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = _tiny_service(
        tmp_path_factory.mktemp("qwen-lightning"), MODEL_VARIANT="edit-2509-lightning-4"
    )
    process.start(timeout=300)
    yield process
    process.stop()


def edit(client: httpx.Client, **inputs: object) -> dict:
    body = {"input": {"image": data_uri(png()), "prompt": "make it blue", **inputs}}
    response = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"})
    assert response.status_code == 200, response.text
    return response.json()


def test_edit_job_end_to_end(service: ServiceProcess) -> None:
    with service.client() as client:
        job = edit(client, width=96, height=64, num_images=2, output_format="webp", seed=5)
        assert job["status"] == "succeeded", job
        assert job["seed"] == 5
        assert [out["name"] for out in job["outputs"]] == ["output_0.webp", "output_1.webp"]
        image = Image.open(io.BytesIO(client.get(job["outputs"][0]["url"]).content))
        assert (image.format, image.size) == ("WEBP", (96, 64))
        assert job["progress"]["total"] == 2


def test_same_seed_same_image_and_random_seed_is_returned(service: ServiceProcess) -> None:
    with service.client() as client:
        first = edit(client, width=64, height=64, seed=42)
        second = edit(client, width=64, height=64, seed=42)
        random_seed = edit(client, width=64, height=64)
        assert isinstance(random_seed["seed"], int)

        def image_bytes(job: dict) -> bytes:
            return client.get(job["outputs"][0]["url"]).content

        assert image_bytes(first) == image_bytes(second)


def test_two_and_three_input_images_on_edit_2509(service: ServiceProcess) -> None:
    with service.client() as client:
        images = [data_uri(png(color)) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
        body = {"input": {"images": images, "prompt": "merge", "width": 64, "height": 64}}
        response = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=60"})
        assert response.json()["status"] == "succeeded"
        body["input"]["images"] = images + images[:1]
        assert client.post("/v1/jobs", json=body).status_code == 422


def test_the_edit_model_takes_one_image() -> None:
    data = QwenEditInput(images=["upl_a", "upl_b"], prompt="x")
    with pytest.raises(InvalidInput, match="takes 1 image"):
        SPEC.check_input(data, Settings(model_variant="edit"))
    SPEC.check_input(data, Settings(model_variant="edit-2509"))


def test_input_validation_is_a_422_naming_the_field(service: ServiceProcess) -> None:
    with service.client() as client:
        cases = [
            ({"prompt": "x"}, "input"),
            ({"image": data_uri(png()), "prompt": ""}, "input.prompt"),
            ({"image": data_uri(png()), "prompt": "x", "width": 65, "height": 64}, "input.width"),
            ({"image": data_uri(png()), "prompt": "x", "num_images": 7}, "input.num_images"),
            ({"image": data_uri(png()), "prompt": "x", "steps": 1}, "input.steps"),
            ({"image": data_uri(b"not an image"), "prompt": "x"}, "input.images[0]"),
            ({"image": "https://127.0.0.1/a.png", "prompt": "x"}, "input.images[0]"),
        ]
        for inputs, field in cases:
            response = client.post("/v1/jobs", json={"input": inputs})
            assert response.status_code == 422, (inputs, response.text)
            assert field in response.json()["error"]["message"], response.json()


def test_cancel_a_running_edit(service: ServiceProcess) -> None:
    with service.client() as client:
        body = {"input": {"image": data_uri(png()), "prompt": "x", "steps": 100}}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        wait_status(client, job_id, {"running"})
        client.post(f"/v1/jobs/{job_id}/cancel")
        job = wait_status(client, job_id, {"canceled"}, timeout=30)
        assert job["progress"]["step"] < 100


def test_legacy_routes(service: ServiceProcess) -> None:
    with service.client() as client:
        bare = base64.b64encode(png()).decode()
        response = client.post(
            "/edit-image", json={"image": bare, "prompt": "x", "num_inference_steps": 2, "seed": 0}
        )
        body = response.json()
        assert response.status_code == 200
        assert body["success"] is True, body
        assert body["model_info"]["seed"] == 0, "seed 0 is a seed, not 'absent'"
        image = Image.open(io.BytesIO(base64.b64decode(body["edited_image"])))
        assert image.format == "JPEG"
        assert client.get(f"/v1/jobs/{body['request_id']}").json()["status"] == "succeeded"
        batch = client.post(
            "/batch-edit-image",
            json={
                "images": [bare, data_uri(png((0, 0, 0)))],
                "prompt": "x",
                "num_inference_steps": 2,
            },
        ).json()
        assert (batch["success"], batch["processed_count"], batch["failed_count"]) == (True, 2, 0)
        bad = client.post("/edit-image", json={"image": "bm90IGFuIGltYWdl", "prompt": "x"})
        assert bad.status_code == 422
        info = client.get("/model-info").json()
        assert info["model_version"] == "edit-2509"
        assert info["model_config"]["tiny"] is True


def test_service_info_says_what_runs(service: ServiceProcess) -> None:
    with service.client() as client:
        info = client.get("/v1/service").json()
        assert info["profile"] == "tiny"
        assert info["model"]["transformer_kind"] == "float32-cpu"
        assert "random-weight" in info["model"]["reason"]
        # the info metric: the loaded variant and its transformer's kind
        metric = (
            f'model_service_info{{model="{info["model"]["variant"]}",precision="float32-cpu",'
            f'service="{info["name"]}",version="{info["version"]}"}} 1.0'
        )
        assert metric in client.get("/metrics").text
        schema = client.get("/openapi.json").json()
        assert "QwenEditInput" in schema["components"]["schemas"]


def test_the_api_process_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from model_service.api.app import create_app\n"
        "from model_service.settings import Settings\n"
        "from qwen_image_edit.service import SPEC\n"
        f"create_app(SPEC, Settings(data_dir={str(tmp_path)!r}, profile='tiny'))\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_openapi_fuzz_finds_no_server_error(service: ServiceProcess) -> None:
    """schemathesis over every route of the service's OpenAPI: no 5xx, ever."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{service.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--exclude-path-regex",
            "/events$",
            "--generation-deterministic",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_full_profile_without_a_gpu_is_not_ready_and_says_why(tmp_path: Path) -> None:
    process = ServiceProcess(
        "model_service.cli",
        tmp_path / "data",
        env={"PROFILE": "full", "MODELS_DIR": str(tmp_path / "models")},
        args=["serve", "qwen-image-edit-nunchaku"],
    )
    process.start(wait_ready=False)
    try:
        with process.client() as client:
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert "no NVIDIA GPU" in ready.json()["reason"]
            assert client.get("/health").status_code == 200
            job = client.post("/v1/jobs", json={"input": {"image": data_uri(png()), "prompt": "x"}})
            assert job.status_code == 202, "jobs are accepted and wait for a ready worker"
    finally:
        process.stop()


def test_legacy_defaults_are_left_to_the_loaded_weights() -> None:
    """The original service's 8 steps at cfg 1 were Lightning settings (it loaded the
    8-step Lightning weights); on the base model those give blurry, unguided edits. Absent
    values are left to the worker, which uses the loaded weights' own (tests below)."""
    values = _job_input("upl_x", EditImageRequest(image="upl_x", prompt="p"))
    edit = QwenEditInput.model_validate(values)
    assert (edit.steps, edit.true_cfg_scale) == (None, None)
    given = _job_input(
        "upl_x",
        EditImageRequest(image="upl_x", prompt="p", num_inference_steps=8, true_cfg_scale=1.0),
    )
    assert (given["steps"], given["true_cfg_scale"]) == (8, 1.0)  # still honoured


def _legacy_defaults(client: httpx.Client) -> tuple[dict, dict]:
    """A legacy edit with no steps or cfg: the job's info and /model-info."""
    body = client.post("/edit-image", json={"image": data_uri(png()), "prompt": "x"}).json()
    assert body["success"] is True, body
    job = client.get(f"/v1/jobs/{body['request_id']}").json()
    assert body["model_info"]["steps"] == job["info"]["steps"]
    return job["info"], client.get("/model-info").json()


def test_legacy_defaults_on_the_base_model_are_its_own(service: ServiceProcess) -> None:
    with service.client() as client:
        info, model_info = _legacy_defaults(client)
    assert (info["steps"], info["true_cfg_scale"]) == (2, 4.0)  # tiny base: 2 steps
    assert (model_info["default_steps"], model_info["default_true_cfg_scale"]) == (2, 4.0)


def test_legacy_defaults_with_lightning_are_lightnings(lightning_service: ServiceProcess) -> None:
    with lightning_service.client() as client:
        info, model_info = _legacy_defaults(client)
    assert (info["steps"], info["true_cfg_scale"]) == (4, 1.0)
    assert model_info["model_version"] == "edit-2509-lightning-4"
    assert (model_info["default_steps"], model_info["default_true_cfg_scale"]) == (4, 1.0)


def test_service_info_says_which_lightning_is_loaded(
    service: ServiceProcess, lightning_service: ServiceProcess
) -> None:
    with lightning_service.client() as client:
        model = client.get("/v1/service").json()["model"]
    assert (model["variant"], model["model"]) == (
        "edit-2509-lightning-4",
        "Qwen/Qwen-Image-Edit-2509",
    )
    assert model["lightning"] == "4-step random-weight LoRA, fused"
    assert model["scheduler"].startswith("Lightning: FlowMatchEulerDiscrete")
    assert model["weights"][-1].endswith("lightning-4steps-lora.safetensors")
    assert (model["default_steps"], model["default_true_cfg_scale"]) == (4, 1.0)
    with service.client() as client:
        base = client.get("/v1/service").json()["model"]
    assert (base["variant"], base["lightning"], len(base["weights"])) == ("edit-2509", None, 1)
    assert base["scheduler"].startswith("the model's own")


def test_inpaint_over_http_keeps_the_pixels_outside_the_mask(service: ServiceProcess) -> None:
    """`mask` turns the edit into an inpaint: the PNG that comes back is the input's, byte
    for byte, farther than `mask_feather` px from the mask; an odd feather is a 422."""
    pixels = np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    mask = Image.new("L", (56, 40), 0)
    mask.paste(255, (20, 10, 36, 24))
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, format="PNG")
    body = {
        "image": data_uri(buffer.getvalue()),
        "mask": data_uri(mask_buffer.getvalue()),
        "mask_feather": 4,
        "prompt": "a red ball",
        "seed": 3,
    }
    with service.client() as client:
        job = edit(client, **body)
        assert job["status"] == "succeeded", job
        assert job["info"]["inpaint"] == {"mask_feather": 4}
        assert (job["info"]["width"], job["info"]["height"]) == (56, 40)
        out = np.asarray(Image.open(io.BytesIO(client.get(job["outputs"][0]["url"]).content)))
        far = np.ones((40, 56), dtype=bool)
        far[10 - 4 : 24 + 4, 20 - 4 : 36 + 4] = False
        assert (out[far] == pixels[far]).all()
        assert (out[10:24, 20:36] != pixels[10:24, 20:36]).any()
        odd = client.post("/v1/jobs", json={"input": body | {"mask_feather": 3}})
        assert odd.status_code == 422
        assert "mask_feather" in odd.text


def test_hires_with_a_mask_and_two_images_over_http(service: ServiceProcess) -> None:
    """The second pass, an inpaint and num_images together: 64x64, then 96x96 (x1.5),
    every image blended; two jobs of one seed give the same bytes."""
    mask = Image.new("L", (64, 48), 0)  # the image's size (the edit makes 64x64)
    mask.paste(255, (8, 8, 40, 30))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    body = {
        "mask": data_uri(buffer.getvalue()),
        "width": 64,
        "height": 64,
        "hires_scale": 1.5,
        "hires_steps": 2,
        "num_images": 2,
        "seed": 9,
    }
    with service.client() as client:
        job = edit(client, **body)
        assert job["status"] == "succeeded", job
        assert job["info"]["hires"] == {"scale": 1.5, "steps": 2, "denoise": 0.5}
        assert (job["progress"]["step"], job["progress"]["total"]) == (4, 4)
        sizes = [Image.open(io.BytesIO(client.get(o["url"]).content)).size for o in job["outputs"]]
        assert sizes == [(96, 96), (96, 96)]
        again = edit(client, **body)
        assert [client.get(o["url"]).content for o in again["outputs"]] == [
            client.get(o["url"]).content for o in job["outputs"]
        ]
        refused = client.post("/v1/jobs", json={"input": body | {"hires_scale": 2.5}})
        assert refused.status_code == 422
        assert "hires_scale" in refused.text


def test_references_over_http(service: ServiceProcess) -> None:
    """A subject and a style reference on the default Edit-2509: the job runs with the
    prompt completed from their roles; a reference without its role is a 422."""
    with service.client() as client:
        refs = [data_uri(png((0, 90, 200))), data_uri(png((250, 250, 0)))]
        job = edit(
            client,
            references=refs,
            reference_roles=["subject", "style"],
            reference_strengths=[1.0, 0.4],
            width=64,
            height=64,
            seed=4,
        )
        assert job["status"] == "succeeded", job
        assert job["info"]["references"] == [
            {"role": "subject", "strength": 1.0},
            {"role": "style", "strength": 0.4},
        ]
        assert "Picture 2" in job["info"]["prompt"]
        assert "Picture 3" in job["info"]["prompt"]
        assert job["input"]["reference_roles"] == ["subject", "style"]
        body = {"input": {"image": data_uri(png()), "prompt": "x", "references": refs[:1]}}
        refused = client.post("/v1/jobs", json=body)
        assert refused.status_code == 422
        assert "reference_roles" in refused.text
