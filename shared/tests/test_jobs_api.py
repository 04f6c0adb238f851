"""The /v1/jobs API end to end over real HTTP, against a real service process."""

import base64
import io
import json
import time
from typing import Any

import httpx
from PIL import Image

from model_service_testing.media import data_uri, png_bytes
from model_service_testing.process import wait_status


def submit(client: httpx.Client, **inputs: object) -> dict:
    response = client.post("/v1/jobs", json={"input": inputs})
    assert response.status_code == 202, response.text
    return response.json()


def test_job_lifecycle_outputs_and_range(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        job = submit(client, text="hello", image=data_uri(png_bytes(color=(10, 200, 30))))
        assert job["status"] == "queued"
        assert isinstance(job["seed"], int)
        assert job["input"]["image"].startswith("data:image/png;base64,")
        done = wait_status(client, job["id"], {"succeeded"})
        assert done["progress"] == {"step": 2, "total": 2, "fraction": 1.0}
        assert done["attempts"] == 1
        assert done["timings"]["run_s"] >= 0
        assert done["info"]["seed_seen"] == job["seed"]
        urls = {out["name"]: out["url"] for out in done["outputs"]}
        image = Image.open(io.BytesIO(client.get(urls["out.png"]).content))
        assert image.getpixel((0, 0)) == (245, 55, 225)  # the input, inverted
        text = client.get(urls["text.txt"], headers={"Range": "bytes=1-3"})
        assert text.status_code == 206
        assert text.content == b"ell"
        assert client.get(f"/v1/jobs/{job['id']}/outputs/../jobs.sqlite3").status_code == 404
        assert client.get(f"/v1/jobs/{job['id']}/outputs/nope.png").status_code == 404


def test_prefer_wait_answers_with_the_finished_job(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        response = client.post(
            "/v1/jobs", json={"input": {"seed": 7}}, headers={"Prefer": "wait=30"}
        )
        assert response.status_code == 200
        assert response.json()["status"] == "succeeded"
        assert response.json()["seed"] == 7
        assert response.headers["preference-applied"] == "wait=30"
        slow = client.post(
            "/v1/jobs", json={"input": {"steps": 20, "step_s": 0.2}}, headers={"Prefer": "wait=1"}
        )
        assert slow.status_code == 202
        assert slow.json()["status"] in {"queued", "running"}


def test_prefer_return_representation_sends_small_outputs_inline(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        body = {"input": {"text": "hi", "image": data_uri(png_bytes(color=(10, 200, 30)))}}
        prefer = {"Prefer": "wait=30, return=representation"}
        response = client.post("/v1/jobs", json=body, headers=prefer)
        assert response.status_code == 200
        assert response.headers["preference-applied"] == "wait=30, return=representation"
        outputs = {out["name"]: out for out in response.json()["outputs"]}
        for out in outputs.values():  # the same bytes as the download
            assert out["data"] == data_uri(client.get(out["url"]).content, out["content_type"])
        assert outputs["text.txt"]["data"] == "data:text/plain;base64,aGk="
        image = Image.open(io.BytesIO(base64.b64decode(outputs["out.png"]["data"].split(",")[1])))
        assert image.getpixel((0, 0)) == (245, 55, 225)
        job_url = f"/v1/jobs/{response.json()['id']}"
        again = client.get(job_url, headers={"Prefer": "return=representation"})
        assert again.headers["preference-applied"] == "return=representation"
        assert again.json()["outputs"] == response.json()["outputs"]
        plain = client.get(job_url)  # not asked for: no data, no header
        assert "preference-applied" not in plain.headers
        assert all("data" not in out for out in plain.json()["outputs"])
        queued = client.post(
            "/v1/jobs",
            json={"input": {"steps": 20, "step_s": 0.2}},
            headers={"Prefer": "return=representation"},
        )
        assert queued.status_code == 202  # not finished: nothing to send, not applied
        assert "preference-applied" not in queued.headers


def test_outputs_too_large_for_inline_are_left_to_their_urls(echo_service) -> None:
    service = echo_service(env={"INLINE_OUTPUTS_MAX_BYTES": "10"})
    with service.client() as client:
        response = client.post(
            "/v1/jobs",
            json={"input": {"text": "more than ten bytes of text"}},
            headers={"Prefer": "wait=30, return=representation"},
        )
        assert response.status_code == 200
        assert response.headers["preference-applied"] == "wait=30"
        assert all("data" not in out for out in response.json()["outputs"])


def test_a_plain_rgb_png_input_is_kept_as_sent_and_others_are_re_encoded(echo_service) -> None:
    service = echo_service()
    buffer = io.BytesIO()  # compressed otherwise than we would: a re-encode differs
    Image.new("RGB", (48, 32), (10, 200, 30)).save(buffer, format="PNG", compress_level=0)
    plain = buffer.getvalue()
    buffer = io.BytesIO()
    Image.new("RGBA", (48, 32), (10, 200, 30, 128)).save(buffer, format="PNG")
    with service.client() as client:
        kept = submit(client, image=data_uri(plain))["id"]
        redone = submit(client, image=data_uri(buffer.getvalue()))["id"]
        for job_id in (kept, redone):
            wait_status(client, job_id, {"succeeded"})
    inputs = [
        service.data_dir / "jobs" / job_id / "inputs" / "image_0.png" for job_id in (kept, redone)
    ]
    assert inputs[0].read_bytes() == plain  # no second encode
    written = Image.open(inputs[1])
    assert written.mode == "RGB"  # transparency composited onto white, then encoded
    assert written.getpixel((0, 0)) == (132, 227, 142)


def test_put_is_idempotent_and_conflicts_on_a_different_body(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        first = client.put("/v1/jobs/my-job-1", json={"input": {"text": "a", "seed": 1}})
        assert first.status_code == 202
        again = client.put("/v1/jobs/my-job-1", json={"input": {"text": "a", "seed": 1}})
        assert again.status_code == 200
        assert again.json()["id"] == "my-job-1"
        other = client.put("/v1/jobs/my-job-1", json={"input": {"text": "b", "seed": 1}})
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_conflict"
        assert client.put("/v1/jobs/bad id!", json={"input": {}}).status_code == 422
        wait_status(client, "my-job-1", {"succeeded"})
        listed = client.get("/v1/jobs").json()["jobs"]
        assert [job["id"] for job in listed] == ["my-job-1"]


def test_list_filters_by_status_and_paginates(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        ids = [submit(client, text=str(i))["id"] for i in range(5)]
        for job_id in ids:
            wait_status(client, job_id, {"succeeded"})
        blocker = submit(client, steps=100, step_s=0.1)["id"]
        ahead, queued = submit(client)["id"], submit(client)["id"]
        wait_status(client, blocker, {"running"})
        # JOBS_AHEAD=1: the engine holds the next job, prepared; it has not begun
        taken = wait_status(client, ahead, {"running"})
        assert taken["timings"]["started_at"] is None
        assert [j["id"] for j in client.get("/v1/jobs?status=queued").json()["jobs"]] == [queued]
        seen, cursor = [], None
        while True:
            params = {"status": "succeeded", "limit": 2} | ({"cursor": cursor} if cursor else {})
            page = client.get("/v1/jobs", params=params).json()
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(ids))
        bad = client.get("/v1/jobs?status=exploded")
        assert bad.status_code == 422
        assert bad.json()["error"]["code"] == "invalid_input"
        client.post(f"/v1/jobs/{blocker}/cancel")


def test_cancel_queued_and_running_jobs(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        running = submit(client, steps=200, step_s=0.05)["id"]
        queued = submit(client)["id"]
        wait_status(client, running, {"running"})
        canceled = client.post(f"/v1/jobs/{queued}/cancel").json()
        assert canceled["status"] == "canceled"
        started = time.monotonic()
        assert client.post(f"/v1/jobs/{running}/cancel").json()["cancel_requested"] is True
        job = wait_status(client, running, {"canceled"}, timeout=10)
        assert time.monotonic() - started < 2, "cancel takes effect at the next step"
        assert job["outputs"] == []
        again = client.post(f"/v1/jobs/{running}/cancel")
        assert again.status_code == 200
        assert again.json()["status"] == "canceled"
        assert client.post("/v1/jobs/unknown/cancel").json()["error"]["code"] == "not_found"
        after = submit(client)["id"]
        assert wait_status(client, after, {"succeeded"})["status"] == "succeeded"


def test_server_sent_events_report_status_and_progress(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        job_id = submit(client, steps=5, step_s=0.05)["id"]
        events = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))))
        statuses = [data["status"] for kind, data in events if kind == "status"]
        steps = [data["progress"]["step"] for kind, data in events if kind == "progress"]
        assert statuses[-1] == "succeeded"
        assert "running" in statuses
        assert steps == sorted(steps)
        assert steps[-1] == 5
        assert client.get("/v1/jobs/nope/events").status_code == 404


def test_bad_input_is_a_clear_422_and_nothing_is_stored(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        cases = [
            ({"input": {"steps": 0}}, "input.steps"),
            ({"input": {"unknown": 1, "text": 5}}, "input.text"),
            ({"input": {"image": "data:image/png;base64,AAAA"}}, "input.image"),
            ({"input": {"image": "upl_doesnotexist"}}, "input.image"),
            ({"input": {"image": "http://127.0.0.1:1/x.png"}}, "input.image"),
            ({"input": {"image": "http://169.254.169.254/latest/meta-data"}}, "input.image"),
            ({"input": {}, "webhook": "http://10.0.0.1/hook"}, "webhook"),
            ({"input": {}, "webhook_events": ["exploded"]}, "webhook_events"),
        ]
        for body, field in cases:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422, (body, response.text)
            error = response.json()["error"]
            assert field in error["message"], (field, error)
            assert error["code"] in {
                "invalid_input",
                "url_not_allowed",
                "upload_not_found",
                "fetch_failed",
            }
        not_json = client.post(
            "/v1/jobs", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 422
        assert client.get("/v1/jobs").json()["jobs"] == []


def test_uploads_feed_jobs_and_are_size_capped(echo_service) -> None:
    service = echo_service(env={"MAX_UPLOAD_BYTES": "50000"})
    with service.client() as client:
        uploaded = client.post("/v1/uploads", files={"file": ("../../etc/x.png", png_bytes())})
        assert uploaded.status_code == 201
        upload_id = uploaded.json()["id"]
        assert upload_id.startswith("upl_")
        assert not (service.data_dir / "etc").exists()
        job = submit(client, image=upload_id)
        assert job["input"]["image"] == upload_id
        wait_status(client, job["id"], {"succeeded"})
        (service.data_dir / "uploads" / upload_id).unlink()  # as the retention sweep does
        expired = client.post("/v1/jobs", json={"input": {"image": upload_id}})
        assert expired.status_code == 422
        assert expired.json()["error"]["code"] == "upload_not_found"
        assert "expired" in expired.json()["error"]["message"]
        big = client.post("/v1/uploads", files={"file": ("big.bin", b"x" * 60000)})
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "payload_too_large"
        corrupt = client.post("/v1/uploads", files={"file": ("bad.png", b"\x89PNG garbage")})
        response = client.post("/v1/jobs", json={"input": {"image": corrupt.json()["id"]}})
        assert response.status_code == 422
        assert "input.image" in response.json()["error"]["message"]


def test_request_body_is_size_capped(echo_service) -> None:
    service = echo_service(env={"MAX_REQUEST_BYTES": "20000"})
    with service.client() as client:
        response = client.post("/v1/jobs", json={"input": {"image": data_uri(b"x" * 30000)}})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"


def test_auth_when_api_keys_are_set(echo_service) -> None:
    service = echo_service(env={"API_KEYS": "key-one, key-two"})
    with httpx.Client(base_url=service.url) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
            response = client.get("/v1/jobs", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
        assert client.get("/metrics").status_code == 401
        ok = client.get("/v1/jobs", headers={"Authorization": "Bearer key-two"})
        assert ok.status_code == 200


def test_no_auth_when_api_keys_are_unset(echo_service) -> None:
    service = echo_service()
    with httpx.Client(base_url=service.url) as client:
        assert client.get("/v1/jobs").status_code == 200


def test_metrics_count_jobs_by_status_and_code(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        wait_status(client, submit(client)["id"], {"succeeded"})
        wait_status(client, submit(client, behaviour="error")["id"], {"failed"})
        text = client.get("/metrics").text
        assert 'model_service_jobs_total{error_code="",status="succeeded"} 1.0' in text
        assert 'model_service_jobs_total{error_code="model_error",status="failed"} 1.0' in text
        assert "model_service_job_queue_wait_seconds_bucket" in text
        assert "model_service_http_request_duration_seconds_bucket" in text
        assert "model_service_jobs_queued 0.0" in text
        # one prefix on every metric; the info metric names what runs (the echo model)
        names = [line.split("{")[0].split(" ")[0] for line in text.splitlines()]
        assert all(n.startswith("model_service_") for n in names if n and n != "#"), names
        assert (
            'model_service_info{model="echo",precision="",service="echo",version="0.0.1"} 1.0'
            in text
        )


def test_metrics_show_the_engine_busy_time_and_gaps_between_queued_jobs(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        jobs = [submit(client, steps=2, step_s=0.1) for _ in range(3)]  # queued at once
        for job in jobs:
            wait_status(client, job["id"], {"succeeded"})
        text = client.get("/metrics").text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith(
            ("model_service_engine_busy_seconds_total", "model_service_job_gap_seconds_count")
        )
    }
    assert samples["model_service_engine_busy_seconds_total"] >= 3 * 0.2  # three jobs of 2 x 0.1 s
    assert samples["model_service_job_gap_seconds_count"] == 2  # the second and third waited


def _job_log_events(service: Any, job_id: str) -> tuple[set[tuple[str, str]], list[dict]]:
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("job_id") == job_id]
    return {(line["logger"], line["event"]) for line in mine}, mine


def test_logs_are_json_with_request_and_job_ids(echo_service) -> None:
    service = echo_service(env={"LOG_LEVEL": "debug"})
    with service.client() as client:
        job_id = submit(client)["id"]
        wait_status(client, job_id, {"succeeded"})
        bad = client.get("/v1/jobs/no-such-job")
    service.stop()
    events, mine = _job_log_events(service, job_id)
    assert ("model_service.http", "request") in events
    assert ("model_service.runner", "job finished") in events
    assert all(line["request_id"] for line in mine if line["logger"] == "model_service.http")
    assert bad.status_code == 404


def test_per_job_lines_are_debug_and_refusals_info(echo_service) -> None:
    """At the default level a succeeded job writes no line of its own (a job's pace
    would fill the logs); a refused request still does."""
    service = echo_service()
    with service.client() as client:
        job_id = submit(client)["id"]
        wait_status(client, job_id, {"succeeded"})
        assert client.get("/v1/jobs/no-such-job").status_code == 404
    service.stop()
    events, _ = _job_log_events(service, job_id)
    assert events == set()
    refused = [
        json.loads(line)
        for line in service.log().splitlines()
        if line.startswith("{") and '"/v1/jobs/no-such-job"' in line
    ]
    assert [(line["event"], line["status"], line["level"]) for line in refused] == [
        ("request", 404, "info")
    ]


def test_worker_threads_setting_reaches_the_worker(echo_service) -> None:
    service = echo_service(env={"WORKER_THREADS": "1"})
    with service.client() as client:
        assert client.get("/v1/service").json()["model"]["omp_threads"] == "1"
