"""Output upload to S3-compatible storage, against moto's real S3 server on loopback."""

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from model_service.errors import StorageFailed
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.settings import Settings
from model_service.storage import OutputStore, StorageRequest
from model_service_testing.process import free_port, wait_status

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3(s3_endpoint: str):
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for bucket in ("outputs-a", "outputs-b", "presigned", "per-request"):
        client.create_bucket(Bucket=bucket)
    public_read = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": "arn:aws:s3:::outputs-a/*",
            }
        ],
    }
    client.put_bucket_policy(Bucket="outputs-a", Policy=json.dumps(public_read))
    return client


def storage_env(endpoint: str, **settings: str) -> dict[str, str]:
    return {**CREDENTIALS, "S3_ENDPOINT_URL": endpoint, **settings}


def run_job(client: httpx.Client, job_id: str, **body: object) -> dict:
    response = client.put(
        f"/v1/jobs/{job_id}",
        json={"input": {"text": "stored"}, **body},
        headers={"Prefer": "wait=30"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def keys(s3, bucket: str) -> set[str]:
    return {item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_outputs_are_uploaded_to_the_configured_bucket(echo_service, s3, s3_endpoint) -> None:
    service = echo_service(env=storage_env(s3_endpoint, S3_BUCKET="outputs-a"))
    with service.client() as client:
        job = run_job(client, "job-a")
        assert job["status"] == "succeeded", job
        outputs = {out["name"]: out for out in job["outputs"]}
        assert set(outputs) == {"out.png", "text.txt"}
        for name, content_type in (("out.png", "image/png"), ("text.txt", "text/plain")):
            out = outputs[name]
            assert out["bucket"] == "outputs-a"
            assert out["key"] == f"outputs/job-a/{name}"
            assert out["storage_url"] == f"{s3_endpoint}/outputs-a/outputs/job-a/{name}"
            obj = s3.get_object(Bucket="outputs-a", Key=out["key"])
            assert obj["ContentType"] == content_type
            local = client.get(out["url"])  # the local copy stays
            assert obj["Body"].read() == local.content
            assert httpx.get(out["storage_url"]).content == local.content  # a public bucket
        assert s3.get_object(Bucket="outputs-a", Key="outputs/job-a/text.txt")["Body"].read() == (
            b"stored"
        )
        # the request's storage goes into the idempotency hash, like webhook
        again = client.put("/v1/jobs/job-a", json={"input": {"text": "stored"}})
        assert again.status_code == 200
        other = client.put(
            "/v1/jobs/job-a",
            json={"input": {"text": "stored"}, "storage": {"bucket": "outputs-b"}},
        )
        assert other.status_code == 409


def test_uploads_run_beside_the_next_job(echo_service, s3, s3_endpoint) -> None:
    """Issue 10: a job's storage upload never delays the next job's start: the next job
    was waiting in the engine and began on the GPU before the first one's end (recorded
    after its upload) was written."""
    service = echo_service(env=storage_env(s3_endpoint, S3_BUCKET="outputs-a"))
    with service.client() as client:
        body = {"input": {"text": "stored", "steps": 3, "step_s": 0.05}}
        first = client.put("/v1/jobs/upload-1", json=body).json()["id"]
        second = client.put("/v1/jobs/upload-2", json=body).json()["id"]
        a = wait_status(client, first, {"succeeded"})
        b = wait_status(client, second, {"succeeded"})
    assert a["outputs"][0]["storage_url"], a  # uploaded
    a_finished = datetime.fromisoformat(a["timings"]["finished_at"]).timestamp()
    assert b["info"]["execution_started_at"] < a_finished, (a, b)
    assert b["info"]["execution_started_at"] - a["info"]["execution_ended_at"] < 0.05


def test_request_overrides_bucket_prefix_and_presign(echo_service, s3, s3_endpoint) -> None:
    service = echo_service(env=storage_env(s3_endpoint, S3_BUCKET="outputs-a"))
    with service.client() as client:
        job = run_job(
            client, "job-b", storage={"bucket": "outputs-b", "prefix": "team/x-", "presign_s": 600}
        )
        assert job["status"] == "succeeded", job
        assert keys(s3, "outputs-b") == {"team/x-job-b/out.png", "team/x-job-b/text.txt"}
        assert not any("job-b" in key for key in keys(s3, "outputs-a"))
        text = next(out for out in job["outputs"] if out["name"] == "text.txt")
        assert "X-Amz-Signature=" in text["storage_url"]
        assert httpx.get(text["storage_url"]).content == b"stored"


def test_presigned_urls_from_settings(echo_service, s3, s3_endpoint) -> None:
    env = storage_env(s3_endpoint, S3_BUCKET="presigned", S3_PREFIX="", S3_PRESIGN_S="300")
    service = echo_service(env=env)
    with service.client() as client:
        job = run_job(client, "job-p")
        out = next(out for out in job["outputs"] if out["name"] == "out.png")
        assert out["key"] == "job-p/out.png"
        url = httpx.URL(out["storage_url"])
        assert url.params["X-Amz-Expires"] == "300"
        fetched = httpx.get(url)
        assert fetched.status_code == 200
        assert fetched.content == client.get(out["url"]).content
        assert fetched.headers["content-type"] == "image/png"
        assert httpx.get(url.copy_with(query=None)).status_code == 403  # a private bucket


def test_missing_bucket_fails_the_job_but_keeps_the_outputs(echo_service, s3, s3_endpoint) -> None:
    service = echo_service(env=storage_env(s3_endpoint, S3_BUCKET="outputs-a"))
    with service.client() as client:
        job = run_job(client, "job-m", storage={"bucket": "no-such-bucket"})
        assert job["status"] == "failed"
        error = job["error"]
        assert error["code"] == "storage_failed"
        assert error["bucket"] == "no-such-bucket"
        assert error["s3_code"] == "NoSuchBucket"
        assert "no-such-bucket" in error["message"]
        assert s3_endpoint in error["message"]
        assert [out["name"] for out in job["outputs"]] == ["out.png", "text.txt"]
        assert all("storage_url" not in out for out in job["outputs"])
        text = client.get("/v1/jobs/job-m/outputs/text.txt")
        assert text.status_code == 200
        assert text.content == b"stored"
        # the service goes on: the next job uploads
        assert run_job(client, "job-m2")["status"] == "succeeded"


def test_without_storage_nothing_is_uploaded(echo_service, s3, s3_endpoint) -> None:
    service = echo_service(env=storage_env(s3_endpoint))
    with service.client() as client:
        before = {bucket: keys(s3, bucket) for bucket in ("outputs-a", "outputs-b", "presigned")}
        job = run_job(client, "job-n")
        assert job["status"] == "succeeded"
        for view in (job, client.get("/v1/jobs/job-n").json()):
            for out in view["outputs"]:
                assert set(out) == {"name", "url", "content_type"}
        assert {b: keys(s3, b) for b in before} == before
        # a storage request without a bucket, when none is configured, is a caller mistake
        no_bucket = client.post("/v1/jobs", json={"input": {}, "storage": {"prefix": "x/"}})
        assert no_bucket.status_code == 422
        assert no_bucket.json()["error"]["field"] == "storage.bucket"
        # a request that names a bucket uploads even when S3_BUCKET is not set
        job = run_job(client, "job-r", storage={"bucket": "per-request"})
        assert job["status"] == "succeeded", job
        assert keys(s3, "per-request") == {"outputs/job-r/out.png", "outputs/job-r/text.txt"}
        listed = client.get("/v1/jobs/job-r").json()["outputs"]
        assert [out["bucket"] for out in listed] == ["per-request", "per-request"]


def test_bad_storage_requests_are_422(echo_service, s3_endpoint) -> None:
    service = echo_service(env=storage_env(s3_endpoint, S3_BUCKET="outputs-a"))
    with service.client() as client:
        for storage in (
            {"bucket": "Bad_Bucket"},
            {"bucket": "ab"},
            {"bucket": "192.168.0.1"},
            {"bucket": "a..b"},
            {"prefix": "../escape/"},
            {"presign_s": -1},
            {"presign_s": 8 * 24 * 3600},
            {"region": "elsewhere"},
        ):
            response = client.post("/v1/jobs", json={"input": {}, "storage": storage})
            assert response.status_code == 422, (storage, response.text)
            assert "storage" in response.json()["error"]["message"], storage
        assert client.get("/v1/jobs").json()["jobs"] == []


@pytest.mark.parametrize(
    "name", ["my-bucket", "a.b.c", "abc", "0" * 63, "xn-ok", "bucket-s3alias-not"]
)
def test_valid_bucket_names(name: str) -> None:
    assert StorageRequest(bucket=name).bucket == name


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "0" * 64,
        "UPPER",
        "under_score",
        "-dash",
        "dash-",
        "a..b",
        "10.0.0.1",
        "xn--abc",
        "b-s3alias",
        "a/b",
    ],
)
def test_invalid_bucket_names(name: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError
        StorageRequest(bucket=name)


def test_plain_urls_on_aws_are_virtual_host_style() -> None:
    store = OutputStore(Settings(s3_region="eu-west-1"), "my-bucket", "p/", 0)
    assert (
        store.url("p/j 1/out.png") == "https://my-bucket.s3.eu-west-1.amazonaws.com/p/j%201/out.png"
    )
    dotted = OutputStore(Settings(s3_region="eu-west-1"), "my.bucket", "", 0)
    assert dotted.url("k") == "https://s3.eu-west-1.amazonaws.com/my.bucket/k"


def test_endpoint_down_is_storage_failed(tmp_path: Path, monkeypatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    settings = Settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}", s3_bucket="b")
    store = OutputStore.for_job(settings, None)
    assert store is not None
    (tmp_path / "out.txt").write_text("x")
    job = Job("job-d", JobStatus.RUNNING, {}, {}, None, "hash")
    with pytest.raises(StorageFailed) as failed:
        asyncio.run(store.upload(job, [tmp_path / "out.txt"]))
    assert failed.value.details["s3_code"] == "EndpointConnectionError"
    assert settings.s3_endpoint_url in failed.value.message
    assert "S3_ENDPOINT_URL" in failed.value.message


def test_stored_outputs_stay_listed_after_local_retention() -> None:
    from model_service.jobs.record import Job
    from model_service.jobs.status import JobStatus
    from model_service.jobs.view import job_view

    stored = {"url": "https://bucket.example/outputs/j1/out.png", "bucket": "b", "key": "k"}
    job = Job(
        id="j1",
        status=JobStatus.SUCCEEDED,
        input={},
        prepared_input={},
        seed=1,
        request_hash="h",
        outputs=["out.png", "text.txt"],
        stored_outputs={"out.png": stored},
    )
    live = job_view(job, "http://svc/").outputs
    assert [o.url for o in live] == [
        "http://svc/v1/jobs/j1/outputs/out.png",
        "http://svc/v1/jobs/j1/outputs/text.txt",
    ]
    job.outputs_expired = True  # the local files are gone; the object is not
    expired = job_view(job, "http://svc/").outputs
    assert [(o.name, o.url, o.storage_url) for o in expired] == [
        ("out.png", stored["url"], stored["url"])
    ]
