"""What is checked when a job is submitted, so that it is a 422 then rather than a job
that fails, or a webhook refused at every attempt; and what the API process imports."""

import io

from PIL import Image

from model_service_testing.media import data_uri
from model_service_testing.process import wait_status


def test_a_webhook_to_a_private_host_name_is_refused_at_submit(echo_service) -> None:
    service = echo_service()  # FETCH_ALLOW_NETWORKS unset: public addresses only
    with service.client() as client:
        for url in ("http://localhost:9/hook", "https://localhost/hook"):
            response = client.post("/v1/jobs", json={"input": {}, "webhook": url})
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "url_not_allowed"
            assert error["field"] == "webhook"
            assert "non-public address" in error["message"]
        assert client.get("/v1/jobs").json()["jobs"] == []


def test_a_webhook_to_an_allowed_network_is_accepted(echo_service) -> None:
    service = echo_service(env={"FETCH_ALLOW_NETWORKS": "127.0.0.0/8,::1/128"})
    with service.client() as client:
        body = {"input": {}, "webhook": "http://localhost:9/hook"}
        assert client.post("/v1/jobs", json=body).status_code == 202


def test_an_image_of_an_extreme_aspect_ratio_is_refused_at_submit(echo_service) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2010, 10)).save(buffer, format="PNG")
    service = echo_service()
    with service.client() as client:
        response = client.post("/v1/jobs", json={"input": {"image": data_uri(buffer.getvalue())}})
        assert response.status_code == 422, response.text
        assert "2010x10" in response.json()["error"]["message"]


def test_the_api_process_imports_no_model_library_after_a_job(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        job = client.post("/v1/jobs", json={"input": {}}).json()
        assert wait_status(client, job["id"], {"succeeded"})["status"] == "succeeded"
        assert client.get("/v1/service").json()["model"]["version"] == "1.0"
        modules = set(client.get("/echo/modules").json())
    # the worker's setup info held a library's own str type (as torch.__version__ is a
    # TorchVersion): sent as a plain str, it imports nothing here
    assert "model_service_testing.echo.version" not in modules
    assert "torch" not in modules


def test_what_the_loaded_model_cannot_do_is_a_422_at_submit(echo_service) -> None:
    """spec.check_against_model sees the worker's facts (the echo model's `refused_text`;
    Qwen's: no job LoRAs on Nunchaku's 4-bit transformer): refused before anything is
    stored, naming the field."""
    service = echo_service()
    with service.client() as client:
        refused = client.get("/v1/service").json()["model"]["refused_text"]
        response = client.post("/v1/jobs", json={"input": {"text": refused}})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_input", "input.text")
        assert "the loaded echo model refuses" in error["message"]
        assert client.get("/v1/jobs").json()["jobs"] == []
        assert client.post("/v1/jobs", json={"input": {"text": "fine"}}).status_code == 202
