"""Cold start of a ComfyUI service with and without the warm-up (WARMUP).

For each setting, a fresh `fastwan2.2-5b-packed` in PROFILE=tiny launches the real
ComfyUI of COMFYUI_TEST_DIR (COMFYUI_TEST_PYTHON its interpreter): the time from the
process start to `/ready` 200 (and `/ready`'s stages), then two jobs of the same work
(each its own prompt and seed, so ComfyUI's cache answers for neither): their wall time
(`POST /v1/jobs` with `Prefer: wait`) and ComfyUI's execution time.

Usage: `COMFYUI_TEST_DIR=... COMFYUI_TEST_PYTHON=... .venv/bin/python bench/cold_start.py
[--out build/bench-cold-start.json]`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from model_service_testing.process import tiny_comfy_process

SERVICE = "fastwan2.2-5b-packed"
JOB: dict[str, Any] = {"width": 64, "height": 64, "num_frames": 9, "fps": 8}


def _job(client: httpx.Client, prompt: str, seed: int) -> dict[str, float]:
    began = time.monotonic()
    response = client.post(
        "/v1/jobs",
        json={"input": {**JOB, "prompt": prompt, "seed": seed}},
        headers={"Prefer": "wait=300"},
    )
    job = response.json()
    if job.get("status") != "succeeded":
        raise RuntimeError(f"job failed: {job}")
    return {
        "wall_s": round(time.monotonic() - began, 2),
        "comfy_execution_s": job["info"]["comfy_execution_s"],
    }


def measure(comfyui_dir: str, warmup: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        service = tiny_comfy_process(Path(root), SERVICE, comfyui_dir, {"WARMUP": str(int(warmup))})
        began = time.monotonic()
        service.start(wait_ready=True, timeout=900)
        ready_s = round(time.monotonic() - began, 2)
        try:
            with httpx.Client(base_url=service.url, timeout=600) as client:
                stages = client.get("/ready").json()["stages"]
                first = _job(client, "a red fox", 1)
                second = _job(client, "a grey owl", 2)
        finally:
            service.stop()
    return {
        "warmup": warmup,
        "time_to_ready_s": ready_s,
        "stages": {stage["stage"]: stage["s"] for stage in stages},
        "first_job": first,
        "second_job": second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench-cold-start.json"))
    args = parser.parse_args()
    comfyui_dir = os.environ.get("COMFYUI_TEST_DIR")
    if not comfyui_dir:
        sys.exit("set COMFYUI_TEST_DIR (and COMFYUI_TEST_PYTHON) to a ComfyUI checkout")
    results = [measure(comfyui_dir, warmup) for warmup in (False, True)]
    for result in results:
        print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
