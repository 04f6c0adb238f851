"""Every error answer has the one shape, `{"error": {"code", "message"}}`: also the ones
Starlette writes itself (the streamed body limit's 413, a bad Range's 400 and 416), and
validation errors stay small however many problems a body has."""

import httpx

from model_service_testing.process import wait_status


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


def test_range_errors_have_the_error_shape(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        job = client.post("/v1/jobs", json={"input": {"text": "hello"}}).json()
        done = wait_status(client, job["id"], {"succeeded"})
        url = next(out["url"] for out in done["outputs"] if out["name"] == "text.txt")
        beyond = client.get(url, headers={"Range": "bytes=100-200"})
        assert_error(beyond, 416, "range_not_satisfiable")
        assert beyond.headers["content-range"] == "bytes */5"
        assert_error(client.get(url, headers={"Range": "bytes=3-1"}), 400, "bad_request")
        assert client.get(url, headers={"Range": "bytes=1-3"}).content == b"ell"


def test_bodies_over_the_limit_are_413s_with_the_error_shape(echo_service) -> None:
    service = echo_service(env={"MAX_REQUEST_BYTES": "1000", "MAX_UPLOAD_BYTES": "1000"})

    def chunks():  # no Content-Length: the streamed limit (1 MiB + 1000) stops it
        for _ in range(64):
            yield b" " * 65536

    with service.client() as client:
        response = client.post(
            "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_error(response, 413, "payload_too_large")
        big = b"x" * (3 << 20)  # declared: refused by Starlette before the route reads it
        response = client.post("/v1/uploads", files={"file": ("a.png", big)})
        assert_error(response, 413, "payload_too_large")


def test_a_body_with_many_unknown_or_bad_fields_gets_a_small_error(echo_service) -> None:
    service = echo_service()
    body = {"input": {}, "webhook_events": list(range(50_000))}  # a problem per item
    with service.client() as client:
        response = client.post("/v1/jobs", json=body)
        error = assert_error(response, 422, "invalid_input")
        assert len(response.content) < 20_000
        assert len(error["problems"]) == 20
        assert error["more_problems"] > 0
        long_key = {"input": {"steps": "x" * 100_000}}
        response = client.post("/v1/jobs", json=long_key)
        assert len(response.content) < 5_000
