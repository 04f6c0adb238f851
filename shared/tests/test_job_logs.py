"""A job's own log (issue 27): GET /v1/jobs/{id}/logs, over HTTP against the echo service
(its worker a real child process): the service's and the worker's lines about the job,
in time order, live while it runs, kept when it ends, capped, without secrets."""

from __future__ import annotations

import time

import httpx

from model_service.job_logs import JobLogs, merged
from model_service_testing.process import run_waiting, wait_status

KEY = "job-log-key-123"


def test_a_failed_jobs_log_holds_the_workers_and_the_services_lines(echo_service) -> None:
    service = echo_service(env={"API_KEYS": KEY, "WEBHOOK_SECRET": "whsec_dGVzdHNlY3JldA=="})
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=service.url, headers=headers, timeout=30) as client:
        job = run_waiting(client, {"behaviour": "error", "text": "a fox"})
        assert job["status"] == "failed"
        log = client.get(f"/v1/jobs/{job['id']}/logs")
        assert log.status_code == 200, log.text
        body = log.json()
        assert (body["job_id"], body["status"], body["complete"]) == (job["id"], "failed", True)
        lines = body["lines"]
        worker = [line for line in lines if "model_service.worker" in line]
        runner = [line for line in lines if "model_service.runner: job finished" in line]
        assert worker, lines
        assert "job failed" in worker[0]
        assert runner, lines
        assert "status=failed" in runner[0]
        assert lines == merged(lines), "in time order"
        assert all(line[:4].isdigit() and line[23] == "Z" for line in lines), lines
        assert not any(KEY in line for line in lines)
        other = client.get("/v1/jobs/not-a-job/logs")
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "not_found"


def test_the_log_is_live_while_the_job_runs(echo_service) -> None:
    service = echo_service()  # LOG_LEVEL INFO: the job keeps its DEBUG lines all the same
    with httpx.Client(base_url=service.url, timeout=30) as client:
        job = client.post(
            "/v1/jobs", json={"input": {"steps": 30, "step_s": 0.1, "behaviour": "ok"}}
        ).json()
        wait_status(client, job["id"], {"running"})
        live = client.get(f"/v1/jobs/{job['id']}/logs").json()
        assert (live["status"], live["complete"]) == ("running", False)
        assert any("model_service.runner: job started" in line for line in live["lines"]), live
        done = wait_status(client, job["id"], {"succeeded"}, timeout=30)
        assert done["status"] == "succeeded"
        deadline = time.monotonic() + 5
        while not (kept := client.get(f"/v1/jobs/{job['id']}/logs").json())["complete"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lines = kept["lines"]
        assert any("job finished status=succeeded" in line for line in lines), lines
        assert not any("model_service.http" in line for line in lines), "not the clients' polls"
        assert lines[: len(live["lines"])] == live["lines"]


def test_no_lines_are_kept_with_job_log_lines_0(echo_service) -> None:
    service = echo_service(env={"JOB_LOG_LINES": "0"})
    with httpx.Client(base_url=service.url, timeout=30) as client:
        job = run_waiting(client, {"behaviour": "error"})
        body = client.get(f"/v1/jobs/{job['id']}/logs").json()
        assert (body["complete"], body["lines"]) == (True, [])


def test_a_long_log_keeps_its_start_and_its_end() -> None:
    logs = JobLogs(max_lines=20)
    logs.open("j")
    for n in range(100):
        logs.add("j", f"line {n}", "src", at=1_700_000_000 + n)
    lines = logs.take("j")
    assert len(lines) == 21
    assert [line.split(": ")[1] for line in lines[:2]] == ["line 0", "line 1"]
    assert lines[2].endswith("... 80 lines left out")
    assert [line.split(": ")[1] for line in lines[3:]] == [f"line {n}" for n in range(82, 100)]
    assert logs.take("j") == []
    assert logs.peek("j") is None
    logs.add("j", "after the end", "src")  # not captured: the job's log is closed
    assert logs.take("j") == []
