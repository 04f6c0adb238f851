"""Jobs ahead (issue 10): while one job runs in ComfyUI, the next one is already prepared
and waiting in ComfyUI's own queue, so ComfyUI starts it the moment the first ends.
Cancel and crash stay exact: canceling the waiting job removes only it; a ComfyUI crash
fails the job it ran and runs the waiting one again. FastWan on the ComfyUI stand-in."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastwan.service import MANIFEST
from model_service.provision import Manifest
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.process import ServiceProcess, wait_status
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

MODELS: dict[str, list[str]] = {}
for _file in Manifest.load(MANIFEST).files:
    MODELS.setdefault(_file.folder, []).append(_file.name)
SMALL = {"width": 64, "height": 64, "num_frames": 9, "fps": 8}
ENDED = {"succeeded", "failed", "canceled"}


def _service(standin: StandinProcess, data: Path) -> ServiceProcess:
    process = ServiceProcess(
        "model_service.cli",
        data,
        env={"COMFYUI_URL": standin.url, "CANCEL_GRACE_S": "3"},
        args=["serve", "fastwan2.2-5b-packed"],
    )
    process.start(timeout=60)
    return process


@pytest.fixture(scope="module")
def standin(comfy_standin: StartStandin) -> StandinProcess:
    return comfy_standin(models=MODELS)


@pytest.fixture(scope="module")
def service(standin: StandinProcess, comfy_service: StartComfyService) -> ServiceProcess:
    return comfy_service("fastwan2.2-5b-packed", standin, env={"CANCEL_GRACE_S": "3"})


@pytest.fixture
def client(service: ServiceProcess, standin: StandinProcess) -> Iterator[httpx.Client]:
    standin.configure(reset=True)
    with service.client() as http:
        yield http


def _submit(client: httpx.Client, prompt: str) -> str:
    response = client.post("/v1/jobs", json={"input": {"prompt": prompt, **SMALL}})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def _comfy_queue(standin: StandinProcess) -> tuple[int, int]:
    queue = httpx.get(standin.url + "/queue", timeout=5).json()
    return len(queue["queue_running"]), len(queue["queue_pending"])


def _until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_next_job_waits_in_comfyuis_queue_and_starts_when_the_first_ends(
    client: httpx.Client, standin: StandinProcess
) -> None:
    standin.configure(slow_nodes={"SamplerCustomAdvanced": 1.5})
    first, second = _submit(client, "first"), _submit(client, "second")
    # while the first runs, the second is already in ComfyUI's queue (prepared, queued)
    _until(lambda: _comfy_queue(standin) == (1, 1))
    assert client.get(f"/v1/jobs/{second}").json()["timings"]["started_at"] is None  # waits
    a = wait_status(client, first, ENDED, timeout=60)
    b = wait_status(client, second, ENDED, timeout=60)
    assert a["status"] == b["status"] == "succeeded", (a, b)
    gap_ms = b["info"]["comfy_started_ms"] - a["info"]["comfy_ended_ms"]
    assert 0 <= gap_ms < 100, gap_ms  # ComfyUI went straight on (a few ms on loopback)
    # the second's run time counts from its real start, not from when it was taken
    started = datetime.fromisoformat(b["timings"]["started_at"]).timestamp()
    assert started * 1000 >= a["info"]["comfy_ended_ms"] - 50
    assert b["info"]["execution_started_at"] * 1000 == pytest.approx(
        b["info"]["comfy_started_ms"], abs=1
    )


def test_canceling_the_waiting_job_removes_only_it(
    client: httpx.Client, standin: StandinProcess
) -> None:
    standin.configure(slow_nodes={"SamplerCustomAdvanced": 2.0})
    first, second = _submit(client, "first"), _submit(client, "second")
    _until(lambda: _comfy_queue(standin) == (1, 1))
    assert client.post(f"/v1/jobs/{second}/cancel").status_code == 200
    canceled = wait_status(client, second, ENDED, timeout=10)
    assert canceled["status"] == "canceled", canceled
    assert _comfy_queue(standin) == (1, 0)  # dequeued from ComfyUI; the first still runs
    assert client.get(f"/v1/jobs/{first}").json()["status"] == "running"
    assert not standin.stats()["interrupt"]  # nothing running was interrupted
    assert wait_status(client, first, ENDED, timeout=60)["status"] == "succeeded"
    assert "comfy_started_ms" not in canceled["info"]  # it never ran
    standin.configure(reset=True)
    third = _submit(client, "third")
    assert wait_status(client, third, ENDED, timeout=60)["status"] == "succeeded"


def test_a_comfyui_crash_fails_its_job_and_runs_the_waiting_one_again(tmp_path: Path) -> None:
    base = tmp_path / "comfy"
    crashing = StandinProcess(
        base, models=MODELS, knobs={"slow_nodes": {"SamplerCustomAdvanced": 3}}
    )
    crashing.start()
    own = _service(crashing, tmp_path / "data")
    restarted: StandinProcess | None = None
    try:
        with own.client() as http:
            first, second = _submit(http, "first"), _submit(http, "second")
            _until(lambda: _comfy_queue(crashing) == (1, 1))
            assert crashing.proc is not None
            os.killpg(crashing.proc.pid, signal.SIGKILL)  # ComfyUI dies mid-job
            a = wait_status(http, first, ENDED, timeout=30)
            assert a["status"] == "failed", a
            assert a["error"]["code"] == "backend_crashed", a
            # the waiting job was not the crash's cause: queued again, its attempt not counted
            _until(lambda: http.get(f"/v1/jobs/{second}").json()["status"] == "queued", 15)
            restarted = StandinProcess(base, models=MODELS)
            restarted.port, restarted.url = crashing.port, crashing.url
            restarted.args[1] = str(crashing.port)
            restarted.start()
            b = wait_status(http, second, ENDED, timeout=60)
            assert b["status"] == "succeeded", b
            assert b["attempts"] == 1, b
    finally:
        own.stop()
        if restarted is not None:
            restarted.stop()
        crashing.stop()
