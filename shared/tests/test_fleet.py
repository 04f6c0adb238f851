"""A fleet: several echo-service processes (pods) on one real redis-server (QUEUE_URL)."""

from __future__ import annotations

import collections
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from model_service_testing.media import data_uri, png_bytes
from model_service_testing.process import RedisServer, ServiceProcess

StartPods = Callable[..., list[ServiceProcess]]


class Fleet:
    def __init__(self, root: Path, redis: RedisServer) -> None:
        self.root = root
        self.redis = redis
        self.run_log = root / "runs.log"
        self.pods: list[ServiceProcess] = []

    def start(self, count: int, env: dict[str, str] | None = None) -> list[ServiceProcess]:
        started = []
        for _ in range(count):
            index = len(self.pods)
            pod = ServiceProcess(
                "model_service_testing.echo.serve",
                self.root / f"pod{index}",
                env={
                    "QUEUE_URL": self.redis.url,
                    "QUEUE_HEARTBEAT_S": "1",
                    "JOB_TIMEOUT_S": "120",
                    "CANCEL_GRACE_S": "2",
                    "ECHO_RUN_LOG": str(self.run_log),
                    **(env or {}),
                },
            )
            pod.env["POD_URL"] = pod.url
            self.pods.append(pod)
            started.append(pod)
        for pod in started:
            pod.start(wait_ready=False)
        for pod in started:
            pod.wait_for("/ready", 120)
        return started

    def runs(self) -> dict[str, collections.Counter[str]]:
        """job id -> how often it started and ended, from the run log."""
        counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        if self.run_log.exists():
            for line in self.run_log.read_text().splitlines():
                event, job_id, _pid = line.split()
                counts[job_id][event] += 1
        return counts

    def pod_at(self, url: str) -> ServiceProcess:
        return next(pod for pod in self.pods if pod.url == url)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with RedisServer(tmp_path / "redis") as redis:
        fleet = Fleet(tmp_path, redis)
        try:
            yield fleet
        finally:
            for pod in fleet.pods:
                pod.stop()


def submit(pod: ServiceProcess, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{pod.url}/v1/jobs", json={"input": fields}, timeout=30)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def get_job(pods: list[ServiceProcess], job_id: str) -> dict[str, Any] | None:
    """The job as the first pod that answers sees it (pods and Redis may be down)."""
    for pod in pods:
        if pod.proc is None:
            continue
        try:
            response = httpx.get(f"{pod.url}/v1/jobs/{job_id}", timeout=5)
        except httpx.TransportError:
            continue
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
    return None


def wait_all(
    pods: list[ServiceProcess], job_ids: list[str], statuses: set[str], timeout: float = 120
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id not in done:
                job = get_job(pods, job_id)
                if job is not None and job["status"] in statuses:
                    done[job_id] = job
        if len(done) == len(job_ids):
            return done
        time.sleep(0.2)
    missing = {job_id: get_job(pods, job_id) for job_id in job_ids if job_id not in done}
    raise TimeoutError(f"{len(missing)} jobs not in {statuses}: {list(missing.items())[:3]}")


@pytest.mark.parametrize("pod_count", [2, 4])
def test_pods_share_one_queue_and_run_each_job_once(fleet: Fleet, pod_count: int) -> None:
    pods = fleet.start(pod_count)
    job_ids = []
    with httpx.Client(timeout=30) as client:
        for index in range(200):
            pod = pods[index % pod_count]  # any pod takes requests
            response = client.post(
                f"{pod.url}/v1/jobs", json={"input": {"text": str(index), "steps": 1}}
            )
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["id"])
    jobs = wait_all(pods, job_ids, {"succeeded", "failed"}, timeout=240)
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    assert all(job["attempts"] == 1 for job in jobs.values())
    runs = fleet.runs()
    assert sorted(runs) == sorted(job_ids)
    assert all(count == {"start": 1, "end": 1} for count in runs.values())
    # every pod worked, and each job's output is served by the pod that ran it
    hosts = collections.Counter(job["outputs"][0]["url"].split("/v1/")[0] for job in jobs.values())
    assert set(hosts) == {pod.url for pod in pods}
    text = httpx.get(jobs[job_ids[7]]["outputs"][1]["url"], timeout=10)
    assert text.text == "7"


def test_job_of_a_killed_pod_finishes_on_another(fleet: Fleet) -> None:
    """A 3 s heartbeat: under a full test run a live pod's 1 s beat once came late enough
    for the other pod to take its job back before the kill (the job then ran on the
    survivor, and the reclaim counted on the pod killed)."""
    pods = fleet.start(2, env={"QUEUE_HEARTBEAT_S": "3"})
    job = submit(pods[0], steps=30, step_s=0.1)
    deadline = time.monotonic() + 30
    while (
        fleet.runs()[job["id"]]["start"] < 1
        or (get_job(pods, job["id"]) or {}).get("progress", {}).get("step", 0) < 3
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    holder = fleet.pod_at(_holder(fleet, job["id"]))
    holder.kill9()
    survivor = next(pod for pod in pods if pod is not holder)
    done = wait_all([survivor], [job["id"]], {"succeeded", "failed"}, timeout=60)[job["id"]]
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["outputs"][0]["url"].startswith(survivor.url)
    assert fleet.runs()[job["id"]] == {"start": 2, "end": 1}
    metrics = httpx.get(f"{survivor.url}/metrics", timeout=5).text
    reclaims = [line for line in metrics.splitlines() if "fleet_reclaims_total{" in line]
    assert 'model_service_fleet_reclaims_total{outcome="requeued"} 1.0' in reclaims, reclaims


def test_a_killed_pods_job_is_taken_back_while_others_wait(fleet: Fleet) -> None:
    """Issue 24: with jobs waiting in the queue, the sweep died on saq's job dict (no
    `attempts` for a queued job) and never ran again, so the killed pod's job stayed
    `running`. A 3 s heartbeat: with six jobs on a loaded machine a live pod's 1 s beat
    can come late enough for its own job to be taken back."""
    pods = fleet.start(2, env={"QUEUE_HEARTBEAT_S": "3"})
    first = [submit(pods[i], steps=40, step_s=0.1)["id"] for i in range(2)]
    deadline = time.monotonic() + 30
    while any(fleet.runs()[job_id]["start"] < 1 for job_id in first):  # one on each pod
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = [submit(pods[i % 2], steps=10, step_s=0.1)["id"] for i in range(4)]
    holder = fleet.pod_at(_holder(fleet, first[0]))
    holder.kill9()
    survivor = next(pod for pod in pods if pod is not holder)
    jobs = wait_all([survivor], [*first, *waiting], {"succeeded", "failed"}, timeout=180)
    failed = {
        job_id: (job.get("error"), job.get("attempts"), job_id in first)
        for job_id, job in jobs.items()
        if job["status"] != "succeeded"
    }
    assert failed == {}, failed  # (error, attempts, one of the first two) of each
    assert jobs[first[0]]["attempts"] == 2
    metrics = httpx.get(f"{survivor.url}/metrics", timeout=5).text
    assert 'model_service_fleet_reclaims_total{outcome="requeued"} 1.0' in metrics
    assert 'model_service_background_task_up{task="fleet-sweep"} 1.0' in metrics


def _holder(fleet: Fleet, job_id: str) -> str:
    """URL of the pod running `job_id` (from the run log's worker pid)."""
    for line in fleet.run_log.read_text().splitlines():
        event, logged_id, pid = line.split()
        if event == "start" and logged_id == job_id:
            for pod in fleet.pods:
                if int(pid) in pod.worker_pids():
                    return pod.url
    raise AssertionError(f"no pod runs {job_id}")


def test_redis_restart_mid_run_loses_nothing(fleet: Fleet) -> None:
    pods = fleet.start(2)
    job_ids = [submit(pods[i % 2], text=str(i), steps=2, step_s=0.05)["id"] for i in range(40)]
    deadline = time.monotonic() + 60
    while sum(count["end"] for count in fleet.runs().values()) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fleet.redis.restart()
    jobs = wait_all(pods, job_ids, {"succeeded", "failed"}, timeout=180)
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    runs = fleet.runs()
    assert all(runs[job_id]["end"] == 1 for job_id in job_ids), runs


def test_a_job_that_kills_its_pods_fails_as_poison(fleet: Fleet) -> None:
    pods = fleet.start(3, env={"JOB_MAX_ATTEMPTS": "2"})
    job = submit(pods[0], behaviour="kill_pod")
    deadline = time.monotonic() + 90
    final = None
    while time.monotonic() < deadline:
        for pod in pods:  # killed pods are seen as dead processes
            if pod.proc is not None and pod.proc.poll() is not None:
                pod.proc = None
        final = get_job(pods, job["id"])
        if final is not None and final["status"] == "failed":
            break
        time.sleep(0.2)
    assert final is not None
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "poison"
    assert final["attempts"] == 2
    assert "died 2 times" in final["error"]["message"]
    assert sum(pod.proc is None for pod in pods) == 2  # two pods died, one marked it


def test_any_pod_serves_events_outputs_uploads_and_cancel(fleet: Fleet) -> None:
    first, second = fleet.start(2)
    long_job = submit(first, steps=400, step_s=0.05)
    deadline = time.monotonic() + 30
    while (get_job([first], long_job["id"]) or {}).get("status") != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    busy = fleet.pod_at(_holder(fleet, long_job["id"]))
    idle = second if busy is first else first
    # a file uploaded to the idle pod, used by a job submitted to the busy one: the job
    # runs on the idle pod (the busy one's worker is taken)
    image = png_bytes((8, 8), (10, 200, 30))
    upload = httpx.post(
        f"{idle.url}/v1/uploads", files={"file": ("in.png", image, "image/png")}, timeout=10
    )
    assert upload.status_code == 201, upload.text
    job = submit(busy, image=upload.json()["id"], text="up")
    done = wait_all([busy], [job["id"]], {"succeeded", "failed"}, timeout=60)[job["id"]]
    assert done["status"] == "succeeded", done
    assert done["outputs"][0]["url"] == f"{idle.url}/v1/jobs/{job['id']}/outputs/out.png"
    redirect = httpx.get(f"{busy.url}/v1/jobs/{job['id']}/outputs/out.png", timeout=10)
    assert redirect.status_code == 307
    assert redirect.headers["location"] == done["outputs"][0]["url"]
    pixel = Image.open(io.BytesIO(httpx.get(redirect.headers["location"]).content)).getpixel((0, 0))
    assert pixel == (245, 55, 225)  # inverted on the idle pod
    # a data-URI input submitted to the idle pod runs there too, from the shared copy
    inline = submit(idle, image=data_uri(png_bytes((4, 4), (0, 0, 0))))
    assert wait_all([idle], [inline["id"]], {"succeeded"}, timeout=60)

    # the long job's events, streamed by the pod that does not run it, and its cancel
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{idle.url}/v1/jobs/{long_job['id']}/events", timeout=30) as sse:
        kind = None
        for line in sse.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind is not None:
                events.append((kind, json.loads(line.split(":", 1)[1])))
                progress = [e for k, e in events if k == "progress"]
                if len(progress) == 3:
                    cancel = httpx.post(f"{idle.url}/v1/jobs/{long_job['id']}/cancel")
                    assert cancel.status_code == 200, cancel.text
    assert len([kind for kind, _ in events if kind == "progress"]) >= 3
    assert events[-1][0] == "status"
    assert events[-1][1]["status"] == "canceled"
    assert fleet.runs()[long_job["id"]] == {"start": 1}


def test_full_queue_answers_429_with_retry_after(fleet: Fleet) -> None:
    (pod,) = fleet.start(1, env={"MAX_QUEUED_JOBS": "2"})
    running = submit(pod, steps=400, step_s=0.05)
    wait_all([pod], [running["id"]], {"running"}, timeout=30)
    queued = [submit(pod, steps=1)["id"] for _ in range(2)]
    refused = httpx.post(f"{pod.url}/v1/jobs", json={"input": {"steps": 1}}, timeout=10)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    for job_id in [*queued, running["id"]]:  # the waiting ones first: none starts
        httpx.post(f"{pod.url}/v1/jobs/{job_id}/cancel", timeout=10)
    wait_all([pod], [running["id"], *queued], {"canceled"}, timeout=30)
    assert httpx.post(f"{pod.url}/v1/jobs", json={"input": {"steps": 1}}).status_code == 202
    metrics = httpx.get(f"{pod.url}/metrics", timeout=5).text
    assert "model_service_jobs_queued_oldest_seconds" in metrics


def test_redis_down_answers_503_and_recovers(fleet: Fleet) -> None:
    (pod,) = fleet.start(1)
    fleet.redis.stop()
    refused = httpx.post(f"{pod.url}/v1/jobs", json={"input": {"steps": 1}}, timeout=30)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"
    assert int(refused.headers["retry-after"]) >= 1
    assert "QUEUE_URL" in refused.json()["error"]["message"]
    assert httpx.get(f"{pod.url}/health", timeout=10).status_code == 200
    # not ready while Redis is away (issue 24: it stayed 200), the failing task named
    deadline = time.monotonic() + 60
    while (ready := httpx.get(f"{pod.url}/ready", timeout=10)).status_code != 503 or (
        'model_service_background_task_up{task="fleet-sweep"} 0.0'
        not in httpx.get(f"{pod.url}/metrics", timeout=10).text
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "QUEUE_URL" in ready.json()["reason"]
    assert "retrying by itself" in ready.json()["reason"]
    fleet.redis.start()
    pod.wait_for("/ready", 60)
    job = submit(pod, steps=1)
    assert wait_all([pod], [job["id"]], {"succeeded"}, timeout=60)


def test_a_stopping_pod_hands_its_job_back_without_counting_it(fleet: Fleet) -> None:
    pods = fleet.start(2)
    job = submit(pods[0], steps=30, step_s=0.1)
    deadline = time.monotonic() + 30
    while fleet.runs()[job["id"]]["start"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    holder = fleet.pod_at(_holder(fleet, job["id"]))
    holder.stop()  # SIGTERM: a deploy or a scale-down
    survivor = next(pod for pod in pods if pod is not holder)
    done = wait_all([survivor], [job["id"]], {"succeeded", "failed"}, timeout=60)[job["id"]]
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1  # the stopped pod's attempt is not counted
    assert done["outputs"][0]["url"].startswith(survivor.url)
    metrics = httpx.get(f"{survivor.url}/metrics", timeout=5).text
    assert (
        'model_service_fleet_reclaims_total{outcome="requeued"}' not in metrics
    )  # handed back, not swept
