"""GPU: the services end to end at full size, on random weights (issue 12).

- `qwen`: Qwen-Image-Edit-2509 through our service (PROFILE=full) on a full-size
  random-weight folder (`gpu_weights.qwen_folder`), once per offload mode (CPU_OFFLOAD):
  a 1 MP edit (1024x1024 PNG in, 1024x1024 out) at a few step counts; seconds per step
  from the difference of two step counts, end to end at the client, the model's reason
  from `/v1/service` (the Nunchaku refusal on Hopper), peak GPU memory seen by NVML; with
  no offload also 40 steps at true_cfg_scale 4 and jobs queued back to back (gap, busy).
- `fastwan`: FastWan2.2-TI2V-5B through our packed service and the real ComfyUI it
  launches (COMFYUI_DIR) on full-size random files (`gpu_weights.comfy_files`): a 5 s
  720p text-to-video (1280x704, 121 frames, 3 steps) end to end, then the same graph sent
  to that ComfyUI directly with a websocket, timed per node (text encode, denoise, VAE
  decode, video encode). `--queued N`: N jobs queued at once (gap, busy ratio).
  `--wan14b 480p 720p ...`: Wan2.2-14B's t2v graph (two fp8 experts + 4-step LoRAs, 81
  frames; `gpu_weights.wan14b_files`) sent to that ComfyUI directly, since the Wan2.2-14B
  service would fetch its real files first.

Needs a CUDA GPU; the model files go to `--root` (random values where the disk has room,
else sparse files of zeros: see `gpu_weights`). Results: `--out` (JSON), lines on stdout.
Usage: `python bench/gpu_service.py qwen fastwan --root /tmp/gpu-bench`
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from gap import measure
from gpu_weights import comfy_files, fill_for, qwen_folder, wan14b_files

from model_service_testing.process import ServiceProcess, free_port

REPO = Path(__file__).resolve().parent.parent
QWEN_BYTES = 58_000_000_000  # transformer 40.9 GB + text encoder 16.6 GB + VAE 0.25 GB
FASTWAN_BYTES = 17_200_000_000  # DiT 10.0 GB + UMT5-XXL fp8 5.7 GB + VAE 1.4 GB
WAIT = {"Prefer": "wait=90"}  # the API's longest wait; longer jobs are then polled


class PeakMemory:
    """The GPU's used memory (NVML, all processes), polled every 50 ms."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.base = self.used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.used())

    def reset(self) -> None:
        self.peak = self.used()

    def rebase(self) -> None:
        """Count from now (before a service starts): its own use, not this process's."""
        self.base = self.peak = self.used()

    def peak_gib(self) -> float:
        return round((self.peak - self.base) / 2**30, 2)

    def close(self) -> None:
        self._stop.set()


def gpu_facts() -> dict[str, Any]:
    import torch

    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def write_weights(
    what: str, folder: Path, need_bytes: int, write: Callable[[str], dict[str, int]]
) -> dict[str, Any]:
    """Write model files with `write(fill)` (random where the disk has room); what it did."""
    fill = fill_for(folder, need_bytes)
    started = time.perf_counter()
    sizes = write(fill)
    seconds = round(time.perf_counter() - started, 1)
    print(f"{what}: wrote {sum(sizes.values()) / 1e9:.1f} GB ({fill}) in {seconds} s")
    return {"fill": fill, "bytes": sizes, "write_s": seconds}


# --- Qwen-Image-Edit --------------------------------------------------------------------


def edit_image(size: int = 1024) -> str:
    from PIL import Image

    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def edit(steps: int, cfg: float, seed: int) -> dict[str, Any]:
    return {
        "image": edit_image(),
        "prompt": f"make the sky blue, take {seed}",
        "steps": steps,
        "true_cfg_scale": cfg,
        "seed": seed,
        "width": 1024,
        "height": 1024,
    }


def timed_job(client: httpx.Client, body: dict[str, Any], memory: PeakMemory) -> dict[str, Any]:
    memory.reset()
    started = time.perf_counter()
    job = client.post("/v1/jobs", json={"input": body}, headers=WAIT).json()
    while job.get("status") in ("queued", "running"):
        time.sleep(0.1)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    end_to_end = time.perf_counter() - started
    if job.get("status") != "succeeded":
        raise RuntimeError(f"job did not succeed: {json.dumps(job)[:2000]}")
    for output in job.get("outputs") or []:
        client.get(output["url"]).raise_for_status()
    info = job.get("info") or {}
    execution = info["execution_ended_at"] - info["execution_started_at"]
    return {
        "end_to_end_s": round(time.perf_counter() - started, 3),
        "until_reply_s": round(end_to_end, 3),
        "execution_s": round(execution, 3),
        "peak_gib": memory.peak_gib(),
    }


def qwen_mode(
    root: Path, models: Path, mode: str, runs: list[tuple[int, float]], memory: PeakMemory
) -> dict[str, Any]:
    """One service start with CPU_OFFLOAD=mode; a warm-up job, then `runs` (steps, cfg)."""
    memory.rebase()
    started = time.perf_counter()
    service = ServiceProcess(
        "model_service.cli",
        root / f"data-qwen-{mode}",
        env={"PROFILE": "full", "MODELS_DIR": str(models), "CPU_OFFLOAD": mode},
        args=["serve", "qwen-image-edit-nunchaku"],
    )
    service.start(timeout=900)
    result: dict[str, Any] = {"mode": mode, "start_s": round(time.perf_counter() - started, 1)}
    try:
        with httpx.Client(base_url=service.url, timeout=1200) as client:
            result["model"] = client.get("/v1/service").json().get("model")
            result["after_load_gib"] = memory.peak_gib()
            print(f"  CPU_OFFLOAD={mode}: ready in {result['start_s']} s; {result['model']}")
            result["warmup"] = timed_job(client, edit(2, 1.0, 1), memory)
            jobs = []
            for steps, cfg in runs:
                job = {
                    "steps": steps,
                    "cfg": cfg,
                    **timed_job(client, edit(steps, cfg, steps), memory),
                }
                print(f"    {steps} steps, true_cfg_scale {cfg:g}: {job}")
                jobs.append(job)
            result["jobs"] = jobs
            result["per_step_s"] = _per_step(jobs)
            if mode == "none":
                queued = [edit(8, 1.0, 100 + i) for i in range(6)]
                result["back_to_back"] = measure(service, queued)
                print(f"    6 jobs of 8 steps queued at once: {result['back_to_back']}")
    finally:
        service.stop()
        shutil.copy(service.log_path, root / f"qwen-{mode}.log")
    return result


def _per_step(jobs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per step for each cfg, from the two step counts furthest apart."""
    out = {}
    for cfg in {job["cfg"] for job in jobs}:
        same = sorted((j for j in jobs if j["cfg"] == cfg), key=lambda j: j["steps"])
        if len(same) >= 2 and same[-1]["steps"] > same[0]["steps"]:
            delta = same[-1]["execution_s"] - same[0]["execution_s"]
            out[f"cfg {cfg:g}"] = round(delta / (same[-1]["steps"] - same[0]["steps"]), 4)
    return out


QWEN_RUNS = {
    "none": [(2, 1.0), (8, 1.0), (8, 1.0), (40, 4.0)],
    "model": [(2, 1.0), (8, 1.0)],
    "sequential": [(2, 1.0), (4, 1.0)],
}


def bench_qwen(
    root: Path, modes: list[str], memory: PeakMemory, result: dict[str, Any], save: Any
) -> None:
    models = root / "qwen-models"
    folder = models / "Qwen-Image-Edit-2509"
    if not (folder / "model_index.json").is_file():
        result["weights"] = write_weights(
            "qwen", models, QWEN_BYTES, lambda fill: qwen_folder(folder, "edit-2509", fill)
        )
    result["modes"] = []
    for mode in modes:
        try:
            result["modes"].append(qwen_mode(root, models, mode, QWEN_RUNS[mode], memory))
        except Exception as exc:  # the next mode may still run (an OOM, say)
            print(f"  CPU_OFFLOAD={mode} failed: {exc!r}"[:3000])
            result["modes"].append({"mode": mode, "error": repr(exc)[:3000]})
        save()


# --- FastWan through ComfyUI ------------------------------------------------------------

FASTWAN_INPUT = {"width": 1280, "height": 704, "num_frames": 121, "steps": 3, "fps": 24}


async def direct_stages(url: str, graph: dict[str, Any]) -> dict[str, Any]:
    """The graph sent to ComfyUI directly; seconds per node class from `executing` events."""
    import aiohttp

    client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
    marks: list[tuple[float, str | None]] = []
    steps: list[float] = []
    async with aiohttp.ClientSession() as session:
        ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:
            body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
            async with session.post(url + "/prompt", json=body) as response:
                response.raise_for_status()
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                data = event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                kind = event.get("type")
                if kind == "execution_error":
                    raise RuntimeError(f"direct run failed: {json.dumps(data)[:2000]}")
                if kind == "progress":
                    steps.append(time.perf_counter())
                if kind == "executing":
                    marks.append((time.perf_counter(), data.get("node")))
                    if data.get("node") is None:
                        break
    stages: dict[str, float] = {}
    for (start, node), (end, _) in itertools.pairwise(marks):
        if node is not None:
            name = graph[node]["class_type"]
            stages[name] = round(stages.get(name, 0.0) + end - start, 3)
    step_times = [round(b - a, 3) for a, b in itertools.pairwise(steps)]
    return {"total_s": round(marks[-1][0] - marks[0][0], 3), "by_node": stages, "steps": step_times}


WAN14B_BYTES = 31_500_000_000  # two experts 14.3 GB each (fp8) + LoRAs + VAE
WAN14B_SIZES = {"480p": (832, 480), "720p": (1280, 720)}


def bench_fastwan(
    root: Path, comfyui_dir: str, memory: PeakMemory, wan14b: list[str], queued: int = 0
) -> dict[str, Any]:
    from fastwan.service import TI2V

    models = root / "fastwan-models"
    result: dict[str, Any] = {}
    if wan14b and not (models / "vae" / "wan_2.1_vae.safetensors").is_file():
        result["wan14b_weights"] = write_weights(
            "wan14b", models, WAN14B_BYTES, lambda fill: wan14b_files(models, comfyui_dir, fill)
        )
    if not (models / "vae" / "wan2.2_vae.safetensors").is_file():
        result["weights"] = write_weights(
            "fastwan", models, FASTWAN_BYTES, lambda fill: comfy_files(models, comfyui_dir, fill)
        )
    port = free_port()
    memory.rebase()
    started = time.perf_counter()
    service = ServiceProcess(
        "model_service.cli",
        root / "data-fastwan",
        env={
            "PROFILE": "full",
            "MODELS_DIR": str(models),
            "COMFYUI_DIR": comfyui_dir,
            "COMFYUI_PYTHON": sys.executable,
            "COMFYUI_PORT": str(port),
        },
        args=["serve", "fastwan2.2-5b-packed"],
    )
    service.start(timeout=600)
    result["start_s"] = round(time.perf_counter() - started, 1)
    print(f"fastwan: service and ComfyUI ready in {result['start_s']} s")
    try:
        with httpx.Client(base_url=service.url, timeout=1200) as client:
            jobs = []
            for i in range(3):  # the first one loads the models into VRAM
                body = {
                    **FASTWAN_INPUT,
                    "prompt": f"a red fox running through snow, take {i}",
                    "seed": i,
                }
                job = timed_job(client, body, memory)
                print(f"  job {i} ({'cold' if i == 0 else 'warm'}): {job}")
                jobs.append(job)
            result["jobs"] = jobs
        if queued:
            bodies = [
                {**FASTWAN_INPUT, "prompt": f"a red fox, queued {i}", "seed": 10 + i}
                for i in range(queued + 1)
            ]
            result["back_to_back"] = measure(service, bodies)
            print(f"  {queued} jobs queued at once: {result['back_to_back']}")
        values = {
            **FASTWAN_INPUT,
            "prompt": "a red fox running through snow, direct",
            "negative_prompt": "",
            "seed": 99,
            "cfg": 1.0,
            "start_image": None,
        }
        graph = TI2V.build(values, tag="direct")
        memory.reset()
        result["direct"] = asyncio.run(direct_stages(f"http://127.0.0.1:{port}", graph))
        result["direct"]["peak_gib"] = memory.peak_gib()
        print(f"  direct to ComfyUI, per node: {result['direct']}")
        result["wan14b"] = [wan14b_run(port, size, i, memory) for i, size in enumerate(wan14b)]
    finally:
        service.stop()
        shutil.copy(service.log_path, root / "fastwan.log")
    return result


def wan14b_run(port: int, size: str, i: int, memory: PeakMemory) -> dict[str, Any]:
    """Our Wan2.2-14B text-to-video graph (two experts, 4-step LoRAs, 81 frames) sent to
    the running ComfyUI directly: the service itself would fetch its real files first."""
    from wan14b.service import T2V

    width, height = WAN14B_SIZES[size]
    values = {
        "prompt": f"a red fox running through snow, wan14b {i}",
        "negative_prompt": "",
        "seed": i,
        "steps": 4,
        "split_step": 2,
        "cfg": 1.0,
        "shift": 5.0,
        "width": width,
        "height": height,
        "num_frames": 81,
        "fps": 16,
        "lightning": True,
        "loras": [],
    }
    memory.reset()
    run = asyncio.run(direct_stages(f"http://127.0.0.1:{port}", T2V.build(values, tag=f"w{i}")))
    run |= {"size": size, "peak_gib": memory.peak_gib()}
    print(f"  wan2.2-14b t2v {size} x 81 frames, direct to ComfyUI: {run}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="+", choices=["qwen", "fastwan"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpu-bench"))
    parser.add_argument(
        "--modes", nargs="+", default=["none", "model", "sequential"], choices=list(QWEN_RUNS)
    )
    parser.add_argument(
        "--wan14b",
        nargs="*",
        default=[],
        choices=list(WAN14B_SIZES),
        help="with fastwan: Wan2.2-14B text-to-video runs on the same ComfyUI (in order; "
        "the first one loads the experts)",
    )
    parser.add_argument(
        "--queued", type=int, default=0, help="with fastwan: also N jobs queued at once (gap)"
    )
    parser.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-gpu-service.json")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    facts = {
        **gpu_facts(),
        **_versions("diffusers", "transformers", "nunchaku", "av"),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"bench: {facts}")
    memory = PeakMemory()
    results: dict[str, Any] = {"facts": facts}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a run cut off by a time limit keeps what it has
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    try:
        if "qwen" in args.what:
            results["qwen"] = {}
            bench_qwen(args.root, args.modes, memory, results["qwen"], save)
        if "fastwan" in args.what:
            if not args.comfyui_dir:
                raise SystemExit("fastwan needs --comfyui-dir (or COMFYUI_DIR): a ComfyUI checkout")
            results["fastwan"] = bench_fastwan(
                args.root, args.comfyui_dir, memory, args.wan14b, args.queued
            )
    finally:
        memory.close()
        save()
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
