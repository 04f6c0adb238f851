"""MODE=serverless: the echo service as a RunPod worker, through the runpod SDK itself.

Two real worker processes: one with the SDK's local dev server (`--rp_serve_api`: `/run`,
`/runsync`, `/status`), and one in production mode against a fake RunPod control plane
(the job-take, job-stop and job-done URLs the SDK reads from RUNPOD_WEBHOOK_*), which is
the only way to reach cancellation and `refresh_worker`: the dev server has no `/cancel`.
"""

import base64
import io
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from model_service import serverless
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.jobs.store import SqliteJobStore
from model_service.jobs.view import Output
from model_service.serverless import ProgressReporter, job_id_for, result_outputs
from model_service_testing.media import data_uri, png_bytes
from model_service_testing.process import free_port

# --- the throttled progress callback and the job ids, in-process ----------------------


def test_progress_is_throttled_and_leaves_the_last_step_to_the_result() -> None:
    now = [100.0]
    sent: list[tuple[str, dict[str, Any]]] = []
    job = {"id": "rp-1", "input": {}}
    report = ProgressReporter(job, lambda j, p: sent.append((j["id"], p)), 0.5, lambda: now[0])
    for step, at in [(1, 100.0), (2, 100.2), (3, 100.49), (4, 100.5), (5, 100.6), (6, 101.2)]:
        now[0] = at
        report(step, 10)
    report(10, 10)  # the end: the result says it
    report(1, 0)  # no total yet
    assert sent == [
        ("rp-1", {"step": 1, "total": 10, "fraction": 0.1}),
        ("rp-1", {"step": 4, "total": 10, "fraction": 0.4}),
        ("rp-1", {"step": 6, "total": 10, "fraction": 0.6}),
    ]


def test_job_id_is_runpods_and_a_retry_of_a_failed_job_runs_again(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")

    def add(job_id: str, status: JobStatus) -> None:
        store.create(
            Job(id=job_id, status=status, input={}, prepared_input={}, seed=1, request_hash="h")
        )

    assert job_id_for(store, "rp-new") == "rp-new"
    add("rp-ok", JobStatus.SUCCEEDED)
    assert job_id_for(store, "rp-ok") == "rp-ok"  # delivered again: the same job
    add("rp-bad", JobStatus.FAILED)
    assert job_id_for(store, "rp-bad") == "rp-bad.2"  # RunPod's /retry: run it again
    add("rp-bad.2", JobStatus.CANCELED)
    assert job_id_for(store, "rp-bad") == "rp-bad.3"
    store.close()


def test_uploaded_outputs_are_urls_and_the_rest_inline_within_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "video.mp4").write_bytes(b"v" * 3000)
    (tmp_path / "note.txt").write_bytes(b"hi")
    outputs = [
        Output(
            name="video.mp4",
            url="/v1/jobs/j/outputs/video.mp4",
            content_type="video/mp4",
            storage_url="https://bucket.example/outputs/j/video.mp4",
        ),
        Output(name="note.txt", url="/v1/jobs/j/outputs/note.txt", content_type="text/plain"),
    ]
    monkeypatch.setattr(serverless, "MAX_INLINE_BYTES", 4)  # "hi" is 4 bytes of base64
    assert result_outputs(outputs, tmp_path) == [
        {
            "name": "video.mp4",
            "content_type": "video/mp4",
            "size": 3000,
            "url": "https://bucket.example/outputs/j/video.mp4",
        },
        {"name": "note.txt", "content_type": "text/plain", "size": 2, "base64": "aGk="},
    ]
    monkeypatch.setattr(serverless, "MAX_INLINE_BYTES", 3)
    assert result_outputs(outputs, tmp_path) is None  # refused before reading a file


# --- a fake RunPod control plane -------------------------------------------------------


class FakeRunPod:
    """Hands out jobs and stop signals (long polls of 0.5 s) and records what the worker
    posts to its job-done URL (progress and results), like RunPod's worker API."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stops: queue.Queue[str] = queue.Queue()
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/job-take/"):
                    self._long_poll(fake.jobs, lambda job: job)
                elif self.path.startswith("/job-stop/"):
                    self._long_poll(fake.stops, lambda job_id: {"jobsToStop": [job_id]})
                else:
                    self.send_response(404)
                    self.end_headers()

            def do_POST(self) -> None:  # /job-done/<worker>/<job id>?...
                job_id = self.path.split("?")[0].rsplit("/", 1)[-1]
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with fake._lock:
                    fake.posts.append((job_id, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _long_poll(self, source: queue.Queue[Any], body: Callable[[Any], Any]) -> None:
                try:
                    data = json.dumps(body(source.get(timeout=0.5))).encode()
                except queue.Empty:
                    self.send_response(204)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posted(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for posted_id, body in self.posts if posted_id == job_id]

    def result(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """The job's final result (not a progress update)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            final = [p for p in self.posted(job_id) if p.get("status") != "IN_PROGRESS"]
            if final:
                return final[-1]
            time.sleep(0.05)
        raise TimeoutError(f"no result for {job_id}; posts: {self.posts}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Worker:
    """`python -m model_service_testing.echo.serve` with MODE=serverless (what `model-service serve`
    runs), in its own process group."""

    def __init__(self, data_dir: Path, env: dict[str, str], args: list[str]) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / "worker.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")},
            "MODE": "serverless",
            "DATA_DIR": str(data_dir),
            "LOG_FORMAT": "json",
            "JOB_TIMEOUT_S": "60",
            "CANCEL_GRACE_S": "2",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            **env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "model_service_testing.echo.serve", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early; log:\n{self.log()}")
            if check():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{what} not after {timeout}s; log:\n{self.log()[-4000:]}")

    def job_status(self, job_id: str) -> str | None:
        """Our job's status, read from the worker's SQLite store."""
        with sqlite3.connect(self.data_dir / "jobs.sqlite3") as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else str(row[0])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _error(body: dict[str, Any]) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body["error"])  # RunPod wants a string
    return error


def _noise_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buffer, "PNG")
    return buffer.getvalue()


# --- the SDK's local dev server (--rp_serve_api) ----------------------------------------


@pytest.fixture(scope="module")
def dev_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[httpx.Client, Worker, FakeRunPod]]:
    fake = FakeRunPod()  # receives the progress updates
    port = free_port()
    worker = Worker(
        tmp_path_factory.mktemp("dev") / "data",
        {
            "SERVERLESS_MAX_INLINE_BYTES": "50000",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{fake.url}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
        },
        ["--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def listening() -> bool:  # the dev server has no /health
        try:
            return client.get("/openapi.json").status_code == 200
        except httpx.TransportError:
            return False

    try:
        worker.wait_until(listening, "the dev server")
        yield client, worker, fake
    finally:
        client.close()
        worker.stop()
        fake.close()


def test_runsync_returns_the_outputs_inline(dev_server) -> None:
    client, worker, _fake = dev_server
    image = data_uri(png_bytes(color=(10, 200, 30)))
    reply = client.post("/runsync", json={"input": {"text": "hi", "image": image, "seed": 5}})
    body = reply.json()
    assert body["status"] == "COMPLETED", body
    output = body["output"]
    assert output["status"] == "succeeded"
    assert output["seed"] == 5
    assert output["info"]["seed_seen"] == 5
    assert output["timings"]["run_s"] >= 0
    outputs = {out["name"]: out for out in output["outputs"]}
    assert set(outputs) == {"out.png", "text.txt"}
    text = base64.b64decode(outputs["text.txt"]["base64"])
    assert text == b"hi"
    assert outputs["text.txt"]["size"] == 2
    assert outputs["text.txt"]["content_type"] == "text/plain"
    png = base64.b64decode(outputs["out.png"]["base64"])
    assert outputs["out.png"]["size"] == len(png)
    assert outputs["out.png"]["content_type"] == "image/png"
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (245, 55, 225)  # inverted
    assert worker.job_status(body["id"]) == "succeeded"  # RunPod's id is our job id


def test_run_then_status(dev_server) -> None:
    client, _worker, _fake = dev_server
    queued = client.post("/run", json={"input": {"text": "later"}}).json()
    assert queued["status"] == "IN_PROGRESS"
    body = client.post(f"/status/{queued['id']}").json()  # the dev server runs it now
    assert body["status"] == "COMPLETED", body
    texts = [o for o in body["output"]["outputs"] if o["name"] == "text.txt"]
    assert base64.b64decode(texts[0]["base64"]) == b"later"


def test_invalid_input_fails_with_our_error_code(dev_server) -> None:
    client, worker, _fake = dev_server
    body = client.post("/runsync", json={"input": {"steps": 0, "behaviour": "dance"}}).json()
    assert body["status"] == "FAILED"
    error = _error(body)
    assert error["code"] == "invalid_input"
    assert {p["field"] for p in error["problems"]} == {"input.steps", "input.behaviour"}
    assert worker.job_status(body["id"]) is None  # nothing was stored


def test_too_large_output_asks_for_object_storage(dev_server) -> None:
    client, _worker, _fake = dev_server
    image = data_uri(_noise_png(160))  # ~77 kB inverted: over the test's 50 kB limit
    body = client.post("/runsync", json={"input": {"image": image}}).json()
    assert body["status"] == "FAILED", body
    error = _error(body)
    assert error["code"] == "output_too_large"
    assert "S3_BUCKET" in error["message"]
    assert error["limit_bytes"] == 50000


def test_progress_updates_are_throttled(dev_server) -> None:
    client, _worker, fake = dev_server
    body = client.post("/runsync", json={"input": {"steps": 10, "step_s": 0.2}}).json()
    assert body["status"] == "COMPLETED", body
    time.sleep(0.5)  # progress is posted by threads of its own
    updates = [p for p in fake.posted(body["id"]) if p.get("status") == "IN_PROGRESS"]
    steps = [u["output"]["step"] for u in updates]
    assert 2 <= len(steps) <= 5, updates  # 2 s of steps, at most one per 0.5 s
    assert all(u["output"]["total"] == 10 and u["output"]["step"] < 10 for u in updates)
    assert updates[0]["output"]["fraction"] == steps[0] / 10


# --- production mode: the SDK's job loop against a fake RunPod -------------------------


@pytest.fixture(scope="module")
def on_runpod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, FakeRunPod]]:
    fake = FakeRunPod()
    worker = Worker(
        tmp_path_factory.mktemp("runpod") / "data",
        {
            "RUNPOD_POD_ID": "worker-1",
            "RUNPOD_WEBHOOK_GET_JOB": f"{fake.url}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{fake.url}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
        },
        [],
    )
    try:
        yield worker, fake
    finally:
        worker.stop()
        fake.close()


def test_worker_loads_before_the_first_job_and_runs_jobs_once(on_runpod) -> None:
    worker, fake = on_runpod
    # the service starts in the SDK's loop as soon as it polls for work
    worker.wait_until(lambda: '"service started"' in worker.log(), "service start")
    job = {"id": "job-1", "input": {"text": "q", "steps": 6, "step_s": 0.2, "seed": 9}}
    fake.jobs.put(job)
    result = fake.result("job-1")
    assert result["output"]["status"] == "succeeded"
    assert result["output"]["seed"] == 9
    assert "stopPod" not in result
    assert any(p.get("status") == "IN_PROGRESS" for p in fake.posted("job-1"))
    fake.jobs.put(job)  # delivered again: answered from the same job, not run twice

    def results() -> list[dict[str, Any]]:
        return [p for p in fake.posted("job-1") if p.get("status") != "IN_PROGRESS"]

    worker.wait_until(lambda: len(results()) == 2, "the second result")
    assert results()[1] == result
    with sqlite3.connect(worker.data_dir / "jobs.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM jobs WHERE id LIKE 'job-1%'").fetchone() == (1,)


def test_runpod_cancel_cancels_the_running_job(on_runpod) -> None:
    worker, fake = on_runpod
    fake.jobs.put({"id": "job-cancel", "input": {"steps": 200, "step_s": 0.1}})
    worker.wait_until(lambda: bool(fake.posted("job-cancel")), "first progress update")
    fake.stops.put("job-cancel")
    worker.wait_until(lambda: worker.job_status("job-cancel") == "canceled", "cancel", 15)
    assert [p for p in fake.posted("job-cancel") if p.get("status") != "IN_PROGRESS"] == []
    fake.jobs.put({"id": "job-after", "input": {}})
    assert fake.result("job-after")["output"]["status"] == "succeeded"


def test_cuda_error_asks_runpod_for_a_new_worker(on_runpod) -> None:
    worker, fake = on_runpod
    fake.jobs.put({"id": "job-cuda", "input": {"behaviour": "cuda_error"}})
    result = fake.result("job-cuda")
    assert _error(result)["code"] == "cuda_error"
    assert result["stopPod"] is True
    fake.jobs.put({"id": "job-cuda", "input": {"behaviour": "cuda_error"}})  # /retry
    worker.wait_until(lambda: worker.job_status("job-cuda.2") == "failed", "the retry")


def test_a_worker_that_can_never_be_ready_fails_jobs_at_once_and_asks_for_another(
    tmp_path: Path,
) -> None:
    fake = FakeRunPod()
    worker = Worker(
        tmp_path / "data",
        {
            "ECHO_FAIL_SETUP": "1",  # the model cannot load here: no job will ever run
            "RUNPOD_POD_ID": "worker-broken",
            "RUNPOD_WEBHOOK_GET_JOB": f"{fake.url}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{fake.url}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
        },
        [],
    )
    try:
        fake.jobs.put({"id": "job-doomed", "input": {"text": "x"}})
        result = fake.result("job-doomed")  # at once, not after RunPod's execution timeout
        error = _error(result)
        assert error["code"] == "not_ready"
        assert "cannot run jobs" in error["message"]
        assert result["stopPod"] is True
        assert worker.job_status("job-doomed") == "canceled"
    finally:
        worker.stop()
        fake.close()
