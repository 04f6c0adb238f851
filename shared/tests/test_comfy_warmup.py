"""The ComfyUI engine's warm-up (WARMUP) and start-up stages, in process, on a launched
stand-in ComfyUI: the warm-up prompt runs before the engine is ready, again after a
ComfyUI restart, and not at all when WARMUP is off or the service declares none."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_service.comfy.engine import ComfyEngine, ComfyServiceSpec
from model_service.comfy.supervisor import ComfySupervisor, LaunchSpec
from model_service.comfy.workflow import Workflow
from model_service.metrics import Metrics
from model_service.settings import Settings
from model_service_testing.comfy_standin import OBJECT_INFO
from model_service_testing.process import free_port

GRAPH = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}


def _warmup(scratch: Path) -> Mapping[str, Any]:
    return {"width": 16}


def _engine(tmp_path: Path, *, warmup: bool, declared: bool = True) -> ComfyEngine:
    (tmp_path / "graph.json").write_text(json.dumps(GRAPH))
    (tmp_path / "manifest.json").write_text(json.dumps({"service": "test", "files": []}))
    workflow = Workflow.load(
        tmp_path / "graph.json", bind={"width": "1.width"}, outputs={"2": "image"}
    )
    spec = ComfyServiceSpec(
        {"only": workflow},
        lambda _: "only",
        tmp_path / "manifest.json",
        warmup_input=_warmup if declared else None,
    )
    port = free_port()
    argv = (sys.executable, "-m", "model_service_testing.comfy_standin", "--port", str(port))
    argv += ("--base-dir", str(tmp_path / "standin"), "--object-info", str(OBJECT_INFO))
    supervisor = ComfySupervisor(LaunchSpec(argv=argv, port=port), backoff_s=(0.2,))
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", warmup=warmup)
    metrics = Metrics("test", lambda: 0.0)
    return ComfyEngine(settings, spec, metrics, supervisor=supervisor, recheck_s=0.1)


async def _prompts(engine: ComfyEngine) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(engine.info["comfyui_url"] + "/standin/stats")
        prompts: list[dict[str, Any]] = response.json()["prompts"]
        return prompts


async def _until_ready(engine: ComfyEngine, seen: list[tuple[bool, str]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ok, _ = engine.readiness
        stage = engine.startup["stage"]
        if not seen or seen[-1] != (ok, stage):
            seen.append((ok, stage))
        if ok:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"not ready: {engine.readiness}")


def test_warm_up_before_ready_and_again_after_a_restart(tmp_path: Path) -> None:
    engine = _engine(tmp_path, warmup=True)

    async def main() -> None:
        await engine.start()
        try:
            seen: list[tuple[bool, str]] = []
            await _until_ready(engine, seen)
            assert (False, "warming up") in seen
            (warm,) = await _prompts(engine)
            assert warm["1"]["inputs"]["width"] == 16  # the warm-up's own values
            assert warm["2"]["inputs"]["filename_prefix"].startswith("x_warmup-")
            assert not (tmp_path / "data" / "warmup").exists()  # its outputs deleted
            # ComfyUI dies: a new one is warmed up before the engine is ready again
            pid = engine._supervisor.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            while engine.readiness[0]:
                await asyncio.sleep(0.01)
            seen.clear()
            await _until_ready(engine, seen)
            assert (False, "warming up") in seen
            assert len(await _prompts(engine)) == 1  # the new stand-in's only prompt
            stages = [stage["stage"] for stage in engine.startup["stages"]]
            assert stages.count("warming up") == 2
            assert stages[-1] == "ready"
        finally:
            await engine.stop(abandon_running=False)

    asyncio.run(main())


@pytest.mark.parametrize(("warmup", "declared"), [(False, True), (True, False)])
def test_no_warm_up_when_off_or_not_declared(tmp_path: Path, warmup: bool, declared: bool) -> None:
    engine = _engine(tmp_path, warmup=warmup, declared=declared)

    async def main() -> None:
        await engine.start()
        try:
            await _until_ready(engine, [])
            assert await _prompts(engine) == []
            startup = engine.startup
            assert [s["stage"] for s in startup["stages"]] == [
                "starting ComfyUI",
                "checking workflows",
                "ready",
            ]
            assert startup["stage"] == "ready"
            assert startup["since_start_s"] >= sum(s["s"] for s in startup["stages"])
        finally:
            await engine.stop(abandon_running=False)

    asyncio.run(main())
