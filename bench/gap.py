"""The GPU's idle time between back-to-back jobs (issue 10's measure), on a ComfyUI
service: N weight-free jobs (EmptyImage, its own colour each -> ImageInvert -> SaveImage)
submitted at once as custom workflows, then, from ComfyUI's own history timestamps
(`info.comfy_started_ms` / `comfy_ended_ms`), the gap between one job's end of execution
and the next one's start, and the whole run (first start to last end) against the sum of
the execution times. Goal: median gap under 5 ms, total within 5% of the sum.

Backends: the stand-in ComfyUI (always) and, with `COMFYUI_TEST_DIR` (+
`COMFYUI_TEST_PYTHON`), a real ComfyUI that the service launches in the tiny profile.

Usage: `.venv/bin/python bench/gap.py [--jobs 50] [--out build/bench-gap.json]`
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from fastwan.service import MANIFEST
from model_service.comfy.standin import StandinProcess
from model_service.provision import Manifest
from model_service.testing import ServiceProcess, tiny_comfy_service

REPO = Path(__file__).resolve().parent.parent
OBJECT_INFO = REPO.parent / "shared" / "reference" / "comfyui-0.33.0-object_info.json"
SERVICE = "fastwan2.2-5b-packed"
GOAL_GAP_MS = 5.0
GOAL_OVER_SUM = 1.05


def graph(index: int, size: int) -> dict[str, Any]:
    empty = {"width": size, "height": size, "batch_size": 1, "color": 4096 + index}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "gap"}},
    }


def measure(service: ServiceProcess, jobs: int, size: int) -> dict[str, Any]:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        client.post(
            "/v1/jobs", json={"input": {"workflow": graph(-1, size)}}, headers={"Prefer": "wait=60"}
        )  # warm-up
        ids = [
            client.post("/v1/jobs", json={"input": {"workflow": graph(i, size)}}).json()["id"]
            for i in range(jobs)
        ]
        deadline = time.monotonic() + 600
        done: list[dict[str, Any]] = []
        while len(done) < len(ids):
            assert time.monotonic() < deadline, "jobs did not finish"
            done = [
                job
                for job in (client.get(f"/v1/jobs/{job_id}").json() for job_id in ids)
                if job["status"] in ("succeeded", "failed", "canceled")
            ]
            if len(done) < len(ids):
                time.sleep(0.2)
    failed = [job for job in done if job["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed: {failed[0]['error']}")
    spans = sorted((job["info"]["comfy_started_ms"], job["info"]["comfy_ended_ms"]) for job in done)
    gaps = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    busy = sum(end - start for start, end in spans)
    total = spans[-1][1] - spans[0][0]
    ordered = sorted(gaps)
    return {
        "jobs": jobs,
        "gap_median_ms": round(statistics.median(gaps), 2),
        "gap_p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 2),
        "gap_max_ms": round(max(gaps), 2),
        "execution_median_ms": round(statistics.median(end - s for s, end in spans), 2),
        "sum_execution_ms": round(busy, 1),
        "total_ms": round(total, 1),
        "total_over_sum": round(total / busy, 3),
        "busy_ratio": round(busy / total, 3),
    }


def run(kind: str, root: Path, jobs: int, size: int) -> dict[str, Any] | None:
    env: dict[str, str] = {"ALLOW_CUSTOM_WORKFLOWS": "1"}
    standin = None
    if kind == "standin":
        if not OBJECT_INFO.is_file():
            print(f"skipped: the stand-in needs {OBJECT_INFO}")
            return None
        models = {f.folder: [f.name] for f in Manifest.load(MANIFEST).files}
        standin = StandinProcess(root / "standin", OBJECT_INFO, models=models).start()
        env["COMFYUI_URL"] = standin.url
        service = ServiceProcess(
            "model_service.cli", root / "data-standin", env=env, args=["serve", SERVICE]
        )
    else:
        service = tiny_comfy_service(root, SERVICE, os.environ["COMFYUI_TEST_DIR"], env)
    try:
        service.start(timeout=300)
        return {"backend": kind, **measure(service, jobs, size)}
    finally:
        service.stop()
        if standin is not None:
            standin.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs queued at once (50)")
    parser.add_argument("--size", type=int, default=256, help="image side of each job (256)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-gap.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="model-service-bench-gap-"))
    print(f"bench: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    results = []
    try:
        kinds = ["standin"] + (["real"] if os.environ.get("COMFYUI_TEST_DIR") else [])
        for kind in kinds:
            result = run(kind, root, args.jobs, args.size)
            if result is None:
                continue
            results.append(result)
            print(
                f"\ngap between back-to-back jobs ({kind}, {result['jobs']} weight-free jobs "
                f"queued at once, ComfyUI's own timestamps)\n"
                f"   gap: median {result['gap_median_ms']} ms, p90 {result['gap_p90_ms']} ms, "
                f"max {result['gap_max_ms']} ms (goal: median < {GOAL_GAP_MS:g} ms)\n"
                f"   execution: median {result['execution_median_ms']} ms per job\n"
                f"   total {result['total_ms']} ms vs sum of executions "
                f"{result['sum_execution_ms']} ms: ratio {result['total_over_sum']} "
                f"(goal: <= {GOAL_OVER_SUM}); busy {result['busy_ratio']:.0%}"
            )
        if kinds == ["standin"]:
            print("   (set COMFYUI_TEST_DIR to also measure a real ComfyUI in the tiny profile)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
