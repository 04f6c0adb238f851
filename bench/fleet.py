"""Fleet benchmark: the Redis queue (QUEUE_URL) against the embedded SQLite store.

Runs the echo test service (model_service_testing.echo) as real processes on loopback
with a real redis-server (`make redis`):

1. Added latency per job: one pod, jobs one after another (`POST` with `Prefer: wait`),
   embedded store vs QUEUE_URL; the ratio of the medians and the difference in ms.
2. Throughput with 1, 2 and 4 pods (processes, each with its worker) on one Redis:
   jobs/s from the first submit to the last success, as a ratio to 1 pod. Two jobs:
   the smallest (one step, no sleep: every cost is ours) and one with 100 ms of
   simulated GPU time (what the queue is for: more pods, more jobs at once).

    .venv/bin/python bench/fleet.py [--jobs 200] [--latency-jobs 100] [--out build/bench-fleet.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from model_service_testing.process import RedisServer, ServiceProcess

ROOT = Path(__file__).resolve().parents[1]


def start_pods(root: Path, count: int, queue_url: str | None) -> list[ServiceProcess]:
    root.mkdir(parents=True, exist_ok=True)
    pods = []
    for index in range(count):
        env = {"JOB_TIMEOUT_S": "120", "LOG_LEVEL": "WARNING"}
        if queue_url:
            env["QUEUE_URL"] = queue_url
        pod = ServiceProcess(
            "model_service_testing.echo.serve",
            root / f"pod{index}",
            env=env,
        )
        pod.env["POD_URL"] = pod.url
        pods.append(pod.start(wait_ready=False))
    for pod in pods:
        pod.wait_for("/ready", 120)
    return pods


def latency_ms(pod: ServiceProcess, jobs: int) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as client:
        for index in range(jobs + 5):
            started = time.perf_counter()
            response = client.post(
                f"{pod.url}/v1/jobs",
                json={"input": {"text": str(index), "steps": 1}},
                headers={"prefer": "wait=30"},
            )
            elapsed = (time.perf_counter() - started) * 1000
            assert response.json()["status"] == "succeeded", response.text
            if index >= 5:  # warm-up
                times.append(elapsed)
    return times


def throughput(pods: list[ServiceProcess], jobs: int, step_s: float) -> float:
    """Jobs per second: 8 client threads submit round-robin over the pods, then every
    job is polled until it succeeded."""

    def submit(index: int) -> tuple[str, str]:
        pod = pods[index % len(pods)]
        response = httpx.post(
            f"{pod.url}/v1/jobs",
            json={"input": {"text": str(index), "steps": 1, "step_s": step_s}},
            timeout=60,
        )
        return pod.url, response.json()["id"]

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        submitted = list(pool.map(submit, range(jobs)))
    with httpx.Client(timeout=60) as client:
        for url, job_id in submitted:
            while client.get(f"{url}/v1/jobs/{job_id}").json()["status"] != "succeeded":
                time.sleep(0.01)
    return jobs / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench-fleet.json")
    args = parser.parse_args()
    if RedisServer.binary() is None:
        print("no redis-server: run `make redis`", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with RedisServer(root / "redis") as redis:
            print("1. added latency per job (one pod, one job at a time)")
            medians = {}
            for name, url in (("embedded", None), ("fleet", redis.url)):
                pods = start_pods(root / f"latency-{name}", 1, url)
                try:
                    medians[name] = statistics.median(latency_ms(pods[0], args.latency_jobs))
                finally:
                    pods[0].stop()
                print(f"   {name:9s} median {medians[name]:6.1f} ms")
            results["latency_ms"] = medians
            results["latency_ratio"] = medians["fleet"] / medians["embedded"]
            print(
                f"   fleet / embedded = {results['latency_ratio']:.2f} "
                f"(+{medians['fleet'] - medians['embedded']:.1f} ms per job)"
            )
            for label, step_s in (("smallest job", 0.0), ("job with 100 ms of GPU time", 0.1)):
                print(f"2. throughput, {args.jobs} jobs: {label}")
                rates = {}
                for count in (1, 2, 4):
                    pods = start_pods(root / f"tp-{step_s}-{count}", count, redis.url)
                    try:
                        rates[count] = throughput(pods, args.jobs, step_s)
                    finally:
                        for pod in pods:
                            pod.stop()
                    print(
                        f"   {count} pod(s): {rates[count]:6.1f} jobs/s "
                        f"(x{rates[count] / rates[1]:.2f} of 1 pod)"
                    )
                results[f"throughput_step_{step_s}"] = rates
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
