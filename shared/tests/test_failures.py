"""Worker crashes, timeouts, OOM, setup failure and kill -9 of the whole service."""

import os
import signal
import time

import httpx

from model_service_testing.process import ServiceProcess, wait_started, wait_status


def submit(client: httpx.Client, **inputs: object) -> str:
    response = client.post("/v1/jobs", json={"input": inputs})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_ready(service: ServiceProcess, timeout: float = 30) -> None:
    service.wait_for("/ready", timeout)


def test_worker_crash_fails_the_job_and_a_new_worker_runs_the_next(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        first_pid = service.worker_pids()
        job = wait_status(client, submit(client, behaviour="crash"), {"failed"})
        assert job["error"]["code"] == "worker_crashed"
        assert "signal 9" in job["error"]["message"]
        assert "Retry" in job["error"]["message"]
        after = wait_status(client, submit(client), {"succeeded"})
        assert after["status"] == "succeeded"
        assert service.worker_pids() != first_pid
        assert (
            'model_service_worker_restarts_total{reason="died"} 1.0' in client.get("/metrics").text
        )


def test_worker_killed_from_outside_mid_job(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        job_id = submit(client, steps=100, step_s=0.1)
        wait_started(client, job_id)
        [pid] = service.worker_pids()
        os.kill(pid, signal.SIGKILL)
        job = wait_status(client, job_id, {"failed"})
        assert job["error"]["code"] == "worker_crashed"
        ready = client.get("/ready")
        if ready.status_code == 503:  # replacement still loading: /ready says so
            assert "worker" in ready.json()["reason"]
        assert wait_status(client, submit(client), {"succeeded"})["attempts"] == 1


def test_worker_exit_code_is_reported(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        job = wait_status(client, submit(client, behaviour="exit"), {"failed"})
        assert "exited with code 3" in job["error"]["message"]


def test_timeout_kills_a_hung_worker_and_the_next_job_runs(echo_service) -> None:
    service = echo_service(env={"JOB_TIMEOUT_S": "1", "CANCEL_GRACE_S": "1"})
    with service.client() as client:
        started = time.monotonic()
        job = wait_status(client, submit(client, behaviour="hang"), {"failed"}, timeout=20)
        assert job["error"]["code"] == "timeout"
        assert "JOB_TIMEOUT_S" in job["error"]["message"]
        assert time.monotonic() - started < 10
        assert wait_status(client, submit(client), {"succeeded"})["status"] == "succeeded"


def test_timeout_stops_a_cooperative_job_at_the_next_step(echo_service) -> None:
    service = echo_service(env={"JOB_TIMEOUT_S": "1"})
    with service.client() as client:
        pids = service.worker_pids()
        job = wait_status(client, submit(client, steps=100, step_s=0.05), {"failed"})
        assert job["error"]["code"] == "timeout"
        assert service.worker_pids() == pids, "a worker that stops in time is kept"


def test_model_errors_and_oom_keep_the_worker(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        pids = service.worker_pids()
        error = wait_status(client, submit(client, behaviour="error"), {"failed"})["error"]
        assert error["code"] == "model_error"
        assert "bad weights for this prompt" in error["message"]
        oom = wait_status(client, submit(client, behaviour="oom"), {"failed"})["error"]
        assert oom["code"] == "out_of_memory"
        assert "smaller" in oom["message"]
        assert service.worker_pids() == pids


def test_cuda_error_replaces_the_worker(echo_service) -> None:
    service = echo_service()
    with service.client() as client:
        pids = service.worker_pids()
        job = wait_status(client, submit(client, behaviour="cuda_error"), {"failed"})
        assert job["error"]["code"] == "cuda_error"
        assert wait_status(client, submit(client), {"succeeded"})["status"] == "succeeded"
        assert service.worker_pids() != pids


def test_setup_failure_is_reported_by_ready_and_jobs_wait(echo_service) -> None:
    service = echo_service(env={"ECHO_FAIL_SETUP": "1"}, wait_ready=False)
    with service.client() as client:
        deadline = time.monotonic() + 30
        while "setup failed" not in client.get("/ready").json()["reason"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert "weights not found at /nowhere" in ready.json()["reason"]
        job_id = submit(client)
        time.sleep(0.5)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_ready_is_503_while_the_model_loads(echo_service) -> None:
    service = echo_service(env={"ECHO_SETUP_S": "3"}, wait_ready=False)
    with service.client() as client:
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["reason"].startswith("starting")
        service.wait_for("/ready", 30)


def test_kill_9_of_the_service_loses_nothing(echo_service, tmp_path) -> None:
    service = echo_service()
    with service.client() as client:
        running = submit(client, steps=40, step_s=0.1, text="was running")
        wait_started(client, running)
        queued = [submit(client, text=f"queued {i}") for i in range(3)]
    service.kill9()
    again = echo_service(data_dir=service.data_dir)
    with again.client() as client:
        job = wait_status(client, running, {"succeeded"}, timeout=60)
        assert job["attempts"] == 2, "the interrupted job ran again"
        for job_id in queued:
            assert wait_status(client, job_id, {"succeeded"})["attempts"] == 1
        text = client.get(f"/v1/jobs/{running}/outputs/text.txt").text
        assert text == "was running"


def test_a_job_that_keeps_killing_the_service_fails_as_interrupted(echo_service) -> None:
    service = echo_service(env={"JOB_MAX_ATTEMPTS": "1"})
    with service.client() as client:
        job_id = submit(client, steps=100, step_s=0.1)
        wait_started(client, job_id)
    service.kill9()
    again = echo_service(env={"JOB_MAX_ATTEMPTS": "1"}, data_dir=service.data_dir)
    with again.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed"
        assert job["error"]["code"] == "interrupted"
        assert "submit it again" in job["error"]["message"]


def test_a_clean_stop_queues_the_running_job_without_using_an_attempt(echo_service) -> None:
    service = echo_service(env={"JOB_MAX_ATTEMPTS": "1"})
    with service.client() as client:
        job_id = submit(client, steps=30, step_s=0.1)
        wait_started(client, job_id)
    service.stop()  # SIGTERM, as a rolling deploy or a RunPod scale-down sends
    again = echo_service(env={"JOB_MAX_ATTEMPTS": "1"}, data_dir=service.data_dir)
    with again.client() as client:
        job = wait_status(client, job_id, {"succeeded"}, timeout=60)
        assert job["attempts"] == 1
