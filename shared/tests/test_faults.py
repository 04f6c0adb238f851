"""Faults from outside the service (issue 24): a job store locked by another process, a
full disk, a worker that dies while idle. None may need a restart or leave a job hanging."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_service_testing.machine import NO_MOUNT
from model_service_testing.media import data_uri, png_bytes
from model_service_testing.process import ServiceProcess, free_port, wait_started, wait_status
from model_service_testing.webhooks import SECRET, Receiver

WEBHOOK_ENV = {"FETCH_ALLOW_NETWORKS": "127.0.0.1/32", "WEBHOOK_SECRET": SECRET}


def submit(client: httpx.Client, **body: Any) -> str:
    response = client.post("/v1/jobs", json={"input": {}, **body})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_ready_reason(client: httpx.Client, *words: str, timeout: float = 60) -> str:
    """Until /ready is 503 with a reason holding every one of `words`."""
    deadline = time.monotonic() + timeout
    reason = ""
    while time.monotonic() < deadline:
        ready = client.get("/ready")
        reason = ready.json()["reason"]
        if ready.status_code == 503 and all(word in reason for word in words):
            return reason
        time.sleep(0.1)
    raise TimeoutError(f"/ready never said {words}; last: {reason}")


def assert_unavailable(response: httpx.Response, code: str, advice: str) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert advice in error["message"]
    assert int(response.headers["retry-after"]) >= 1


@contextlib.contextmanager
def locked(db_path: Path) -> Iterator[None]:
    """Another process's write lock on the job store (as the sqlite3 CLI's BEGIN EXCLUSIVE)."""
    db = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    db.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def test_a_locked_store_stops_nothing_for_good(echo_service, tmp_path: Path) -> None:
    hook = Receiver(free_port(), answer_after_s=3)  # its answer comes while the lock is held
    service = echo_service(env={**WEBHOOK_ENV, "JOBS_AHEAD": "0"})
    try:
        with service.client() as client:
            running = submit(
                client,
                input={"steps": 50, "step_s": 0.1},
                webhook=hook.url,
                webhook_events=["running", "succeeded"],
            )
            wait_started(client, running)
            waiting = submit(client)  # taken once `running` ends: while the lock is held
            hook.wait_arrived(1)
            with locked(service.data_dir / "jobs.sqlite3"):
                refused = client.post("/v1/jobs", json={"input": {}})
                assert_unavailable(refused, "store_busy", "locked by another process")
                # the runner cannot claim `waiting`: /ready names it, and it goes on
                reason = wait_ready_reason(client, "job-runner", "store_busy")
                assert "retrying by itself" in reason
                assert client.get("/health").status_code == 200
                assert client.get(f"/v1/jobs/{running}").status_code == 200  # reads work
            for job_id in (running, waiting):
                assert wait_status(client, job_id, {"succeeded"}, timeout=60)["attempts"] == 1
            service.wait_for("/ready", 60)
            assert wait_status(client, submit(client), {"succeeded"})["status"] == "succeeded"
            payloads = hook.wait(2, timeout=60)  # the sender outlived the lock too
            assert sorted(p["type"] for p in payloads) == ["job.running", "job.succeeded"]
            metrics = client.get("/metrics").text
            assert 'model_service_background_task_up{task="job-runner"} 1.0' in metrics
            assert (
                'model_service_background_task_failures_total{error_code="store_busy",task="job-runner"}'
                in (metrics)
            )
    finally:
        hook.close()
    log = service.log()
    assert "stopped by a bug" not in log
    assert log.count('"background task failed; retrying"') <= 2, "logged once per failure"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs (root only: mount)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"{NO_MOUNT}: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """A file that takes every free byte under `folder`."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    return filler


def wait_logged(service: ServiceProcess, *words: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(all(word in line for word in words) for line in service.log().splitlines()):
        assert time.monotonic() < deadline, f"never logged {words}"
        time.sleep(0.1)


def test_a_full_disk_answers_503_ends_jobs_and_recovers(echo_service, small_disk: Path) -> None:
    service = echo_service(data_dir=small_disk)
    with service.client() as client:
        running = submit(client, input={"steps": 30, "step_s": 0.1})
        wait_started(client, running)
        waiting = submit(client)  # taken ahead: it waits in the engine
        filler = fill(small_disk)
        upload = client.post("/v1/uploads", files={"file": ("a.png", png_bytes((64, 64)))})
        assert_unavailable(upload, "disk_full", "Free space in DATA_DIR")
        inline = client.post("/v1/jobs", json={"input": {"image": data_uri(png_bytes((64, 64)))}})
        assert_unavailable(inline, "disk_full", "Free space in DATA_DIR")
        # the running job cannot write its outputs: it ends with a code, it does not hang
        wait_logged(service, '"job failed"', '"disk_full"')
        filler.unlink()  # space is back
        ended = wait_status(client, running, {"succeeded", "failed"}, timeout=60)
        assert ended["error"]["code"] == "disk_full", ended
        assert "Free space in DATA_DIR" in ended["error"]["message"]
        other = wait_status(client, waiting, {"succeeded", "failed"}, timeout=60)
        assert other["status"] == "succeeded" or other["error"]["code"] == "disk_full", other
        service.wait_for("/ready", 60)
        again = client.post("/v1/uploads", files={"file": ("a.png", png_bytes((64, 64)))})
        assert again.status_code == 201, again.text
        assert wait_status(client, submit(client), {"succeeded"})["status"] == "succeeded"
        retried = client.post(f"/v1/jobs/{running}/retry")
        assert retried.status_code == 200, retried.text
        assert wait_status(client, running, {"succeeded"})["status"] == "succeeded"
    assert "stopped by a bug" not in service.log()


def test_a_worker_that_dies_idle_is_replaced_at_once(echo_service) -> None:
    service: ServiceProcess = echo_service()
    with service.client() as client:
        [pid] = service.worker_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60  # /ready comes back with no job submitted
        while service.worker_pids() in ([pid], []) or client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.1)
        assert (
            'model_service_worker_restarts_total{reason="died"} 1.0' in client.get("/metrics").text
        )
        assert wait_status(client, submit(client), {"succeeded"})["attempts"] == 1
