"""The GPU's idle time between back-to-back jobs (issue 10's measure): N jobs submitted at
once, then, from the engine's own timestamps (`info.execution_started_at` / `_ended_at`:
ComfyUI's history times, or the worker's around `predict`), the gap between one job's
end of execution and the next one's start, and the whole run (first start to last end)
against the sum of the execution times. Goal: median gap under 5 ms, total within 5% of
the sum. ComfyUI jobs are weight-free custom workflows (EmptyImage, its own colour each
-> ImageInvert -> SaveImage); direct-pipeline jobs are tiny Qwen-Image-Edit edits.

Each backend runs twice: JOBS_AHEAD=0 (the baseline: the next job is taken only when the
last one ended, as before issue 10) and JOBS_AHEAD=1 (the default: the next job waits,
prepared, in ComfyUI's own queue).

Backends: the stand-in ComfyUI (its work per job simulated by a sleep, `--gpu-ms`), the
tiny Qwen service (the direct pipeline, on this machine's CPU) and, with
`COMFYUI_TEST_DIR` (+ `COMFYUI_TEST_PYTHON`), a real ComfyUI that the service launches
in the tiny profile (`--size`: the image side of each job).

Usage: `.venv/bin/python bench/gap.py [--jobs 50] [--out build/bench-gap.json]`
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from fastwan.service import MANIFEST
from model_service.provision import Manifest
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.process import ServiceProcess, tiny_comfy_process

REPO = Path(__file__).resolve().parent.parent
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


def edit_input(index: int, size: int) -> dict[str, Any]:
    """A Qwen edit of a noise image of `size` px (its decode and the output's encode are the
    CPU work the worker does beside the GPU's), 256 px out."""
    pixels = random.Random(index).randbytes(size * size * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buffer, format="PNG", compress_level=1)
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"image": uri, "prompt": f"edit {index}", "width": 256, "height": 256}


def small_qwen_models(root: Path) -> Path:
    """A MODELS_DIR whose Qwen-Image-Edit folder holds the tiny random-weight pipeline as
    if it were the real one (its marker removed), so PROFILE=full loads it on the GPU:
    the service's CUDA path (transformer choice, offload, bf16) at a small size."""
    from qwen_image_edit.manifest import get_variant
    from qwen_image_edit.tiny_model import MARKER_FILE, build_tiny_pipeline

    models = root / "qwen-gpu-models"
    folder = models / get_variant(None).local_dirname
    if not folder.is_dir():
        folder.mkdir(parents=True)
        build_tiny_pipeline(folder)
        (folder / MARKER_FILE).unlink()
    return models


def measure(service: ServiceProcess, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The jobs queued at once (after one warm-up job); from each job's engine timestamps
    (`info.execution_started_at` / `execution_ended_at`: ComfyUI's own history times, or
    the worker's around `predict`), the gaps and the busy ratio."""
    with httpx.Client(base_url=service.url, timeout=120) as client:
        warm = client.post("/v1/jobs", json={"input": inputs[0]}, headers={"Prefer": "wait=120"})
        assert warm.json()["status"] == "succeeded", warm.text
        ids = [client.post("/v1/jobs", json={"input": body}).json()["id"] for body in inputs[1:]]
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
    spans = sorted(
        (job["info"]["execution_started_at"] * 1000, job["info"]["execution_ended_at"] * 1000)
        for job in done
    )
    gaps = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    busy = sum(end - start for start, end in spans)
    total = spans[-1][1] - spans[0][0]
    ordered = sorted(gaps)
    return {
        "jobs": len(spans),
        "gap_median_ms": round(statistics.median(gaps), 2),
        "gap_p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 2),
        "gap_max_ms": round(max(gaps), 2),
        "execution_median_ms": round(statistics.median(end - s for s, end in spans), 2),
        "sum_execution_ms": round(busy, 1),
        "total_ms": round(total, 1),
        "total_over_sum": round(total / busy, 3),
        "busy_ratio": round(busy / total, 3),
    }


def run(kind: str, root: Path, jobs: int, size: int, ahead: int, gpu_ms: float) -> dict[str, Any]:
    env: dict[str, str] = {"ALLOW_CUSTOM_WORKFLOWS": "1", "JOBS_AHEAD": str(ahead)}
    standin = None
    inputs = [{"workflow": graph(i, size)} for i in range(jobs + 1)]
    if kind in ("qwen", "qwen-gpu"):
        if kind == "qwen-gpu":
            env |= {"PROFILE": "full", "MODELS_DIR": str(small_qwen_models(root))}
        else:
            env |= {"PROFILE": "tiny", "MODELS_DIR": str(root / "qwen-models")}
        inputs = [edit_input(i, size) for i in range(jobs + 1)]
        service = ServiceProcess(
            "model_service.cli",
            root / f"data-{kind}-{ahead}",
            env=env,
            args=["serve", "qwen-image-edit-nunchaku"],
        )
    elif kind == "standin":
        models = {f.folder: [f.name] for f in Manifest.load(MANIFEST).files}
        # the stand-in's nodes take ~1 ms; a GPU's work is simulated by a sleep per job
        knobs = {"slow_nodes": {"ImageInvert": gpu_ms / 1000}}
        standin = StandinProcess(root / f"standin-{ahead}", models=models, knobs=knobs).start()
        env["COMFYUI_URL"] = standin.url
        service = ServiceProcess(
            "model_service.cli", root / f"data-standin-{ahead}", env=env, args=["serve", SERVICE]
        )
    else:
        (root / f"real-{ahead}").mkdir()
        service = tiny_comfy_process(
            root / f"real-{ahead}", SERVICE, os.environ["COMFYUI_TEST_DIR"], env
        )
    try:
        service.start(timeout=300)
        return {"backend": kind, "jobs_ahead": ahead, **measure(service, inputs)}
    finally:
        service.stop()
        if standin is not None:
            standin.stop()


def report(result: dict[str, Any]) -> None:
    print(
        f"   JOBS_AHEAD={result['jobs_ahead']}: gap median {result['gap_median_ms']} ms, "
        f"p90 {result['gap_p90_ms']} ms, max {result['gap_max_ms']} ms; execution median "
        f"{result['execution_median_ms']} ms; total {result['total_ms']:.0f} ms vs sum "
        f"{result['sum_execution_ms']:.0f} ms: ratio {result['total_over_sum']} "
        f"(busy {result['busy_ratio']:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs queued at once (50)")
    parser.add_argument(
        "--size",
        type=int,
        default=1024,
        help="image side of each job (1024: real ComfyUI takes tens of ms per job on a CPU)",
    )
    parser.add_argument(
        "--gpu-ms", type=float, default=50.0, help="the stand-in's simulated work per job (50)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["standin", "qwen", "real", "qwen-gpu"],
        help="these backends (default: standin, qwen, and real with COMFYUI_TEST_DIR); "
        "qwen-gpu needs a CUDA GPU",
    )
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-gap.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="model-service-bench-gap-"))
    print(f"bench: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    results = []
    try:
        kinds = args.only or (
            ["standin", "qwen"] + (["real"] if os.environ.get("COMFYUI_TEST_DIR") else [])
        )
        for kind in kinds:
            what = {
                "standin": f"the stand-in ComfyUI, {args.gpu_ms:g} ms of simulated work per job",
                "real": f"a real ComfyUI (tiny profile), EmptyImage {args.size}px -> invert "
                "-> save",
                "qwen": f"the direct pipeline: tiny Qwen-Image-Edit, {args.size}px PNG in, "
                "256px out",
                "qwen-gpu": "the direct pipeline on the GPU: PROFILE=full on a small "
                f"random-weight Qwen-Image-Edit, {args.size}px PNG in, 256px out",
            }[kind]
            print(
                f"\ngap between back-to-back jobs: {args.jobs} jobs queued at once "
                f"on {what}; the engine's own timestamps (baseline JOBS_AHEAD=0: the next "
                "job is taken when the last one ended)"
            )
            pair = [run(kind, root, args.jobs, args.size, ahead, args.gpu_ms) for ahead in (0, 1)]
            for result in pair:
                report(result)
                results.append(result)
            base, ahead = pair
            print(
                f"   jobs ahead vs baseline: total x{ahead['total_ms'] / base['total_ms']:.3f}; "
                f"goal: median gap < {GOAL_GAP_MS:g} ms "
                f"({'met' if ahead['gap_median_ms'] < GOAL_GAP_MS else 'missed'}), total <= "
                f"{GOAL_OVER_SUM} x sum "
                f"({'met' if ahead['total_over_sum'] <= GOAL_OVER_SUM else 'missed'})"
            )
        if not args.only and "real" not in kinds:
            print("   (set COMFYUI_TEST_DIR to also measure a real ComfyUI in the tiny profile)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
