"""The network-storage start-up: a ComfyUI engine with `download_at_start` fetches the
manifest's missing files from the Hub (a real server on loopback, answering like the
Hub), says so in its readiness meanwhile, and checks its workflow against ComfyUI (the
stand-in) once they are in place."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_service.comfy.engine import ComfyEngine, ComfyServiceSpec
from model_service.comfy.workflow import Workflow
from model_service.metrics import Metrics
from model_service.settings import Settings
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.hub_standin import COMMIT, Server, blob, sha

# huggingface_hub in this process calls the Hub look-alike
pytestmark = pytest.mark.usefixtures("hub_reachable")

VAE = "tiny_vae.safetensors"
UNET = "tiny_unet.safetensors"
GRAPH = {
    "1": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
    "2": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
    "3": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandinProcess]:
    models = {"vae": [VAE], "diffusion_models": [UNET]}
    with StandinProcess(tmp_path / "comfy", models=models) as process:
        yield process


def manifest_file(tmp_path: Path, files: dict[tuple[str, str], bytes]) -> Path:
    entries = [
        {
            "name": name,
            "folder": folder,
            "hub": {"repo_id": "org/repo", "path": f"split/{name}", "revision": COMMIT},
            "size_bytes": len(data),
            "sha256": sha(data),
        }
        for (folder, name), data in files.items()
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"service": "test", "files": entries}))
    return path


def engine_for(tmp_path: Path, hub: Server, standin: StandinProcess, manifest: Path) -> ComfyEngine:
    graph_path = tmp_path / "graph.json"
    graph_path.write_text(json.dumps(GRAPH))
    workflow = Workflow.load(graph_path, bind={}, outputs={"4": "image"})
    spec = ComfyServiceSpec({"only": workflow}, lambda _: "only", manifest, download_at_start=True)
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "models",
        comfyui_url=standin.url,
        hf_endpoint=hub.url,
    )
    return ComfyEngine(settings, spec, Metrics("test", lambda: 0.0))


async def ready_within(engine: ComfyEngine, seconds: float, seen: list[str]) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ok, reason = engine.readiness
        if ok:
            return True
        if not seen or seen[-1] != reason:
            seen.append(reason)
        await asyncio.sleep(0.01)
    return False


async def start_until_ready(engine: ComfyEngine) -> tuple[bool, list[str]]:
    """Start the engine; (ready within 60 s, each readiness reason seen on the way)."""
    seen: list[str] = []
    await engine.start()
    try:
        return await ready_within(engine, 60, seen), seen
    finally:
        await engine.stop(abandon_running=False)


def test_missing_models_are_downloaded_at_start_then_checked(
    tmp_path: Path, hub: Server, standin: StandinProcess
) -> None:
    files = {("vae", VAE): blob(1), ("diffusion_models", UNET): blob(2, 3_000_000)}
    for (_, name), data in files.items():
        hub.add(f"/hub/org/repo/split/{name}", data)
    hub.knobs.chunk_delay_s = 0.01  # slow enough to see the stage
    engine = engine_for(tmp_path, hub, standin, manifest_file(tmp_path, files))

    ready, seen = asyncio.run(start_until_ready(engine))
    assert ready, seen
    assert any(reason.startswith("downloading 2 model file(s)") for reason in seen), seen
    for (folder, name), data in files.items():
        assert (tmp_path / "models" / folder / name).read_bytes() == data
    assert not any((tmp_path / "models").rglob("*.part"))


def test_a_file_the_hub_lacks_keeps_the_engine_unready_naming_it(
    tmp_path: Path, hub: Server, standin: StandinProcess
) -> None:
    files = {("vae", VAE): blob(1), ("diffusion_models", UNET): blob(2)}
    hub.add(f"/hub/org/repo/split/{VAE}", files[("vae", VAE)])  # the UNet is not there
    engine = engine_for(tmp_path, hub, standin, manifest_file(tmp_path, files))

    async def scenario() -> tuple[bool, list[str]]:
        seen: list[str] = []
        await engine.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any("retrying" in r for r in seen):
                if await ready_within(engine, 0.2, seen):
                    return True, seen
            return False, seen
        finally:
            await engine.stop(abandon_running=False)

    ready, seen = asyncio.run(scenario())
    assert not ready
    failed = next(reason for reason in seen if "retrying" in reason)
    assert "model download failed" in failed
    assert f"diffusion_models/{UNET}" in failed, failed
    assert (tmp_path / "models" / "vae" / VAE).read_bytes() == files[("vae", VAE)]
    assert not (tmp_path / "models" / "diffusion_models" / UNET).exists()


def test_a_bug_while_preparing_is_retried_not_fatal(
    tmp_path: Path, hub: Server, standin: StandinProcess
) -> None:
    """A bug in the engine's preparation (here: the workflow check raising once) leaves
    `/ready` saying so and starts over by itself; the service needs no restart."""
    files = {("vae", VAE): blob(1), ("diffusion_models", UNET): blob(2)}
    for (folder, name), data in files.items():
        (tmp_path / "models" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / folder / name).write_bytes(data)
    engine = engine_for(tmp_path, hub, standin, manifest_file(tmp_path, files))
    check = engine._check_workflows
    calls = []

    async def flaky(runs: int) -> None:
        calls.append(runs)
        if len(calls) == 1:
            raise RuntimeError("a bug in the check")
        await check(runs)

    engine._check_workflows = flaky  # type: ignore[method-assign]

    ready, seen = asyncio.run(start_until_ready(engine))
    assert ready, seen
    assert any("a bug in the check" in r and "retrying by itself" in r for r in seen), seen
    assert len(calls) == 2
