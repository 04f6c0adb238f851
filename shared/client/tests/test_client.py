"""The blocking client against real service processes on loopback (no mocks)."""

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client_testing import KEY, fetch, pixel, png_bytes
from model_service_client import Client, Job, JobFailed, ServiceError
from model_service_testing.process import RedisServer, ServiceProcess
from model_service_testing.pytest_plugin import echo_process


def test_submit_and_wait_report_progress(client: Client) -> None:
    job = client.submit({"text": "hi", "steps": 4, "step_s": 0.05})
    assert job.status in {"queued", "running"}
    seen: list[Job] = []
    done = client.wait(job.id, on_progress=seen.append, timeout=30)
    assert done.status == "succeeded"
    assert done.done
    assert done.progress == 1.0
    assert {out.name for out in done.outputs} == {"out.png", "text.txt"}
    fractions = [j.progress for j in seen]
    assert any(0 < f < 1 for f in fractions), fractions  # the steps, from the SSE events
    assert fractions == sorted(fractions)
    assert seen[-1].status == "succeeded"
    # Prefer: wait answers with the finished job
    quick = client.submit({"text": "quick"}, wait_s=30)
    assert quick.status == "succeeded"
    assert quick.raw["input"]["text"] == "quick"


def test_submit_with_own_id_is_idempotent(client: Client) -> None:
    first = client.submit({"text": "a", "seed": 1}, job_id="client-put-1")
    again = client.submit({"text": "a", "seed": 1}, job_id="client-put-1")
    assert first.id == again.id == "client-put-1"
    with pytest.raises(ServiceError) as info:
        client.submit({"text": "b", "seed": 1}, job_id="client-put-1")
    assert (info.value.status_code, info.value.code) == (409, "idempotency_conflict")
    assert client.wait("client-put-1", timeout=30).status == "succeeded"


def test_events_stream(client: Client) -> None:
    job = client.submit({"steps": 5, "step_s": 0.05})
    events = list(client.events(job.id))
    kinds = {event.kind for event in events}
    assert kinds == {"status", "progress"}
    assert events[0].kind == "status"
    assert events[-1].job.status == "succeeded"
    steps = [e.job.raw["progress"]["step"] for e in events if e.kind == "progress"]
    assert steps == sorted(steps)
    assert steps[-1] == 5
    with pytest.raises(ServiceError) as info:
        next(iter(client.events("no-such-job")))
    assert (info.value.status_code, info.value.code) == (404, "not_found")


def test_list_pages_through_jobs(client: Client) -> None:
    ids = [client.submit({"text": f"page {i}"}).id for i in range(5)]
    for job_id in ids:
        client.wait(job_id, timeout=30)
    first = client.list(status="succeeded", limit=2)
    assert len(first.jobs) == 2
    assert first.next_cursor is not None
    seen, cursor, pages = [], None, 0
    while True:
        page = client.list(status="succeeded", limit=2, cursor=cursor)
        assert len(page.jobs) <= 2
        assert all(job.status == "succeeded" for job in page.jobs)
        seen += [job.id for job in page.jobs]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages >= 3
    assert [job_id for job_id in seen if job_id in ids] == list(reversed(ids))  # newest first
    assert len(seen) == len(set(seen))


def test_cancel_a_running_job(client: Client) -> None:
    job = client.submit({"steps": 200, "step_s": 0.05})
    for event in client.events(job.id):
        if event.job.status == "running":
            break
    canceled = client.cancel(job.id)
    assert canceled.raw["cancel_requested"] is True
    done = client.wait(job.id, timeout=15, raise_on_failure=True)  # canceled: not raised
    assert done.status == "canceled"
    assert done.outputs == []
    assert client.cancel(job.id).status == "canceled"  # idempotent


def test_retry_a_failed_job(client: Client) -> None:
    job = client.submit({"behaviour": "error"})
    failed = client.wait(job.id, timeout=30)  # returned, not raised, by default
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error["code"] == "model_error"
    with pytest.raises(JobFailed) as info:
        client.wait(job.id, timeout=30, raise_on_failure=True)
    assert info.value.code == "model_error"
    assert "bad weights" in info.value.message
    assert info.value.job.id == job.id
    assert isinstance(info.value, ServiceError)
    again = client.retry(job.id)
    assert again.id == job.id
    assert again.status == "queued"
    assert again.error is None
    rerun = client.wait(job.id, timeout=30)
    assert rerun.status == "failed"  # it ran again (the same input fails the same way)
    assert rerun.raw["timings"]["started_at"] > failed.raw["timings"]["finished_at"]
    ok = client.submit({}, wait_s=30)
    with pytest.raises(ServiceError) as wrong:
        client.retry(ok.id)
    assert (wrong.value.status_code, wrong.value.code) == (409, "wrong_job_state")


def test_upload_used_as_input_and_download(client: Client, tmp_path: Path) -> None:
    from_bytes = client.upload(png_bytes((10, 200, 30)), filename="in.png")
    path = tmp_path / "blue.png"
    path.write_bytes(png_bytes((0, 0, 255)))
    from_path = client.upload(path)
    assert from_bytes.startswith("upl_")
    assert from_path.startswith("upl_")
    assert from_bytes != from_path
    job = client.submit({"image": from_path, "text": "uploaded"})
    assert job.raw["input"]["image"] == from_path
    done = client.wait(job.id, timeout=30)
    assert done.status == "succeeded"
    files = client.download(done, tmp_path / "out")
    assert sorted(p.name for p in files) == ["out.png", "text.txt"]
    by_name = {p.name: p for p in files}
    assert pixel(by_name["out.png"].read_bytes()) == (255, 255, 0)  # blue, inverted
    assert by_name["text.txt"].read_bytes() == b"uploaded"
    for output in done.outputs:  # exactly the bytes the API serves
        assert output.url is not None
        assert by_name[output.name].read_bytes() == fetch(output.url)
    again = client.download(job.id, tmp_path / "by-id")  # by id: the job is fetched first
    assert [p.read_bytes() for p in sorted(again)] == [p.read_bytes() for p in sorted(files)]
    assert not list((tmp_path / "out").glob("*.part"))


def test_bad_input_raises_the_apis_code_and_message(client: Client) -> None:
    with pytest.raises(ServiceError) as info:
        client.submit({"steps": 0, "behaviour": "dance"})
    error = info.value
    assert error.status_code == 422
    assert error.code == "invalid_input"
    assert "input.steps" in error.message
    assert error.details["field"] in {"input.steps", "input.behaviour"}
    assert {p["field"] for p in error.details["problems"]} == {"input.steps", "input.behaviour"}
    assert str(error).startswith("invalid_input: ")
    with pytest.raises(ServiceError) as missing:
        client.get("no-such-job")
    assert (missing.value.status_code, missing.value.code) == (404, "not_found")


def test_api_key_is_required_and_then_works(
    service: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in (None, "wrong-key"):
        with Client(service.url, key) as anonymous, pytest.raises(ServiceError) as info:
            anonymous.list()
        assert (info.value.status_code, info.value.code) == (401, "unauthorized")
        assert "API key" in info.value.message
    with Client(service.url, KEY) as keyed:
        assert keyed.list(limit=1).jobs is not None
    monkeypatch.setenv("MODEL_SERVICE_URL", service.url)
    monkeypatch.setenv("MODEL_SERVICE_API_KEY", KEY)
    with Client() as from_env:  # both from the environment
        assert from_env.base_url == service.url
        assert from_env.submit({"text": "env"}, wait_s=30).status == "succeeded"
    monkeypatch.delenv("MODEL_SERVICE_URL")
    with pytest.raises(ValueError, match="MODEL_SERVICE_URL"):
        Client()


def test_wait_falls_back_to_polling_when_the_stream_drops(tmp_path: Path) -> None:
    """The service is killed (-9) while `wait` follows the job's events, and started again:
    the job runs again and `wait` still returns it finished."""
    service = echo_process(tmp_path / "data").start()
    try:
        with Client(service.url) as client:
            job = client.submit({"steps": 20, "step_s": 0.05})
            started = threading.Event()
            result: list[Job | BaseException] = []

            def follow() -> None:
                def progress(j: Job) -> None:
                    if j.progress > 0:
                        started.set()

                try:
                    result.append(client.wait(job.id, on_progress=progress, timeout=60))
                except BaseException as exc:
                    result.append(exc)

            thread = threading.Thread(target=follow)
            thread.start()
            assert started.wait(20)
            service.kill9()  # the stream drops mid-job
            service.start()  # same port and data: the interrupted job is queued again
            thread.join(60)
            assert len(result) == 1
            done = result[0]
            assert isinstance(done, Job), done
            assert done.status == "succeeded"
            assert done.raw["attempts"] == 2  # it was interrupted while `wait` followed it
    finally:
        service.stop()


# --- a fleet: outputs are served by the pod that holds them (307 from the others) --------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    with RedisServer(tmp_path / "redis") as redis:
        pods = []
        for index in range(2):
            pod = echo_process(
                tmp_path / f"pod{index}",
                {"QUEUE_URL": redis.url, "QUEUE_HEARTBEAT_S": "1", "API_KEYS": KEY},
            )
            pod.env["POD_URL"] = pod.url
            pods.append(pod)
        try:
            for pod in pods:
                pod.start(wait_ready=False)
            for pod in pods:
                pod.wait_for("/ready", 60)
            yield pods
        finally:
            for pod in pods:
                pod.stop()


def test_download_follows_a_fleet_redirect_with_the_key(
    fleet: list[ServiceProcess], tmp_path: Path
) -> None:
    with Client(fleet[0].url, KEY) as client:
        done = client.submit({"text": "fleet"}, wait_s=30)
    assert done.status == "succeeded"
    holder_url = done.outputs[0].url
    assert holder_url is not None
    holder = next(pod for pod in fleet if holder_url.startswith(pod.url + "/"))
    other = next(pod for pod in fleet if pod is not holder)
    # the output asked of the other pod: a 307 to the holder, which wants the key too
    moved = [
        dataclasses.replace(out, url=f"{other.url}/v1/jobs/{done.id}/outputs/{out.name}")
        for out in done.outputs
    ]
    first = httpx.get(moved[0].url or "", headers={"Authorization": f"Bearer {KEY}"})
    assert first.status_code == 307
    assert first.headers["location"].startswith(holder.url)
    with Client(other.url, KEY) as client:
        files = client.download(dataclasses.replace(done, outputs=moved), tmp_path)
    assert {p.name: p.read_bytes() for p in files} == {
        out.name: fetch(out.url or "") for out in done.outputs
    }


# --- the tiny Qwen-Image-Edit service (a real pipeline, CPU) -----------------------------


def test_qwen_edit_with_an_uploaded_image(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("qwen")
    service = ServiceProcess(
        "model_service.cli",
        root / "data",
        env={"PROFILE": "tiny", "MODELS_DIR": str(root / "models"), "JOB_TIMEOUT_S": "120"},
        args=["serve", "qwen-image-edit-nunchaku"],
    )
    service.start(timeout=300)
    try:
        with Client(service.url) as client:
            image = client.upload(png_bytes((200, 40, 40), size=48), filename="red.png")
            job = client.submit(
                {"image": image, "prompt": "make it blue", "width": 64, "height": 64, "seed": 3},
                wait_s=60,
            )
            done = client.wait(job.id, timeout=60, raise_on_failure=True)
            files = client.download(done, root / "out")
        assert [p.name for p in files] == ["output_0.png"]
        assert files[0].read_bytes() == fetch(done.outputs[0].url or "", key=None)
        from PIL import Image

        with Image.open(files[0]) as edited:
            assert (edited.format, edited.size) == ("PNG", (64, 64))
    finally:
        service.stop()
