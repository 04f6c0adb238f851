"""Warm start (WARMUP=1): the service runs one small prompt of its own workflow before
`/ready` says 200, so the first job finds the models loaded.

On the stand-in, loading is the `UNETLoader` node made slow (`slow_nodes`): the warm-up
pays it, and the first job takes the loader's output from ComfyUI's cache. On the real
ComfyUI (tiny weights) the first job's execution time is compared with the second's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from fastwan.service import MANIFEST
from model_service.provision import Manifest
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.machine import needs_real_comfyui
from model_service_testing.process import ServiceProcess, watch_ready
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

MODELS = {file.folder: [file.name] for file in Manifest.load(MANIFEST).files}
LOAD_S = 3.0  # the stand-in's model load: UNETLoader takes this long when not cached
UNET = "37"  # the workflow's UNETLoader
JOB = {"prompt": "a red fox", "width": 64, "height": 64, "num_frames": 9, "fps": 8, "seed": 1}


def _service(root: Path, standin: StandinProcess, warmup: str) -> ServiceProcess:
    return ServiceProcess(
        "model_service.cli",
        root / "data",
        env={"COMFYUI_URL": standin.url, "WARMUP": warmup},
        args=["serve", "fastwan2.2-5b-packed"],
    )


def _job(client: httpx.Client, **changes: Any) -> dict[str, Any]:
    body = {"input": {**JOB, **changes}}
    response = client.post("/v1/jobs", json=body, headers={"Prefer": "wait=120"})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    assert job["status"] == "succeeded", job.get("error")
    return job


def _cached_nodes(standin: StandinProcess, prompt_id: str) -> list[str]:
    """The nodes of that prompt's run that ComfyUI took from its cache (not run again)."""
    return next(nodes for ran, nodes in standin.stats()["cached"] if ran == prompt_id)


@pytest.fixture
def slow_standin(comfy_standin: StartStandin) -> StandinProcess:
    """A fresh stand-in (an empty node cache) whose model load takes LOAD_S."""
    return comfy_standin(models=MODELS, knobs={"slow_nodes": {"UNETLoader": LOAD_S}})


def test_ready_only_after_the_warm_up_and_the_first_job_loads_nothing(
    slow_standin: StandinProcess, tmp_path: Path
) -> None:
    service = _service(tmp_path, slow_standin, "1").start(wait_ready=False)
    try:
        seen = watch_ready(service)
        warming = [body for body in seen if body.get("stage") == "warming up"]
        assert warming, seen
        assert all(body["status"] == 503 for body in warming)
        assert "warming up" in warming[0]["reason"]
        assert warming[0]["ready"] is False
        ready = seen[-1]
        assert ready["ready"] is True
        assert ready["reason"] == "ready"
        assert ready["stage"] == "ready"
        took = {stage["stage"]: stage["s"] for stage in ready["stages"]}
        assert list(took) == ["starting ComfyUI", "checking workflows", "warming up", "ready"]
        assert took["warming up"] >= LOAD_S * 0.9
        assert ready["since_start_s"] >= took["warming up"]

        # the warm-up was the one prompt before any job: the service's own workflow,
        # smallest size; no job record, no job counted, its files gone
        prompts = slow_standin.stats()["prompts"]
        assert len(prompts) == 1
        warm = prompts[0]
        assert warm[UNET]["class_type"] == "UNETLoader"
        assert (warm["55"]["inputs"]["width"], warm["55"]["inputs"]["length"]) == (64, 5)
        assert "warmup" in warm["58"]["inputs"]["filename_prefix"]
        with service.client() as client:
            assert client.get("/v1/jobs").json()["jobs"] == []
            assert "jobs_total{" not in client.get("/metrics").text
            assert not (service.data_dir / "warmup").exists()

            job = _job(client)
        prompts = slow_standin.stats()["prompts"]
        assert len(prompts) == 2
        assert prompts[1][UNET] == warm[UNET]
        assert UNET in _cached_nodes(slow_standin, job["info"]["comfy_prompt_id"])
        assert job["info"]["comfy_execution_s"] < LOAD_S * 0.5  # no load step
    finally:
        service.stop()


def test_without_warm_up_ready_at_once_and_the_first_job_pays_the_load(
    slow_standin: StandinProcess, tmp_path: Path
) -> None:
    service = _service(tmp_path, slow_standin, "0").start(wait_ready=False)
    try:
        seen = watch_ready(service)
        stages = [stage["stage"] for stage in seen[-1]["stages"]]
        assert "warming up" not in stages
        assert stages[-1] == "ready"
        assert slow_standin.stats()["prompts"] == []
        with service.client() as client:
            job = _job(client)
        assert UNET not in _cached_nodes(slow_standin, job["info"]["comfy_prompt_id"])
        assert job["info"]["comfy_execution_s"] >= LOAD_S * 0.9
    finally:
        service.stop()


def test_a_failed_warm_up_is_logged_and_the_service_becomes_ready(
    comfy_standin: StartStandin, tmp_path: Path
) -> None:
    standin = comfy_standin(
        models=MODELS,
        knobs={"fail_nodes": {"UNETLoader": {"message": "weights are corrupt"}}},
    )
    service = _service(tmp_path, standin, "1").start(wait_ready=False)
    try:
        seen = watch_ready(service)
        assert "warming up" in [stage["stage"] for stage in seen[-1]["stages"]]
        assert "warm-up failed" in service.log()
        assert "weights are corrupt" in service.log()
        with service.client() as client:  # the job meets (and reports) the real error
            response = client.post("/v1/jobs", json={"input": JOB}, headers={"Prefer": "wait=60"})
            job = response.json()
        assert job["status"] == "failed"
        assert "weights are corrupt" in job["error"]["message"]
    finally:
        service.stop()


@pytest.fixture(scope="module")
def tiny_warm(tiny_comfy_service: StartComfyService) -> ServiceProcess:
    return tiny_comfy_service("fastwan2.2-5b-packed", env={"WARMUP": "1"})


@needs_real_comfyui
def test_tiny_first_job_after_warm_up_runs_as_fast_as_the_second(
    tiny_warm: ServiceProcess,
) -> None:
    with tiny_warm.client() as client:
        stages = {s["stage"]: s["s"] for s in client.get("/ready").json()["stages"]}
        assert stages["warming up"] > 0
        assert "Requested to load WAN22" in tiny_warm.log()  # the warm-up loaded it
        before = len(tiny_warm.log())
        # the same work twice (nothing of one job in ComfyUI's cache for the other)
        first = _job(client, prompt="a red fox", seed=1)["info"]["comfy_execution_s"]
        during_first = tiny_warm.log()[before:]
        second = _job(client, prompt="a grey owl", seed=2)["info"]["comfy_execution_s"]
    # ComfyUI logs each model it loads: the first job loaded none
    for line in ("Requested to load", "model weight dtype", "VAE load device"):
        assert line not in during_first
    # without the warm-up the first job took about 4x the second (bench/README.md); the
    # bound is loose: the tiny models run on a CPU that other processes share
    assert first <= second * 2 + 5, (first, second)
