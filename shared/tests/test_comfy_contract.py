"""Contract tests of our ComfyUI client.

They always run against the stand-in (`model_service_testing.comfy_standin`, a real separate
process on loopback), and also against a real ComfyUI 0.33 when `COMFYUI_TEST_URL` is
set (weight-free core nodes only). Tests that need the stand-in's fault knobs skip on
the real server.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import shutil
import subprocess
import sys
import time
import uuid
import wave
from array import array
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from PIL import Image

from model_service.comfy import (
    ComfyClient,
    ComfyCrashed,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyOutOfMemory,
    ComfyProgress,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
    OutputFile,
)
from model_service.errors import InvalidInput, JobCanceled, JobFailure
from model_service_testing import machine
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.process import free_port

MODELS = {"checkpoints": ["tiny-sd.safetensors"]}

Graph = dict[str, Any]


@dataclass
class Backend:
    kind: str
    url: str
    standin: StandinProcess | None


@pytest.fixture(scope="module", params=["standin", "real"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    if request.param == "real":
        yield Backend("real", machine.skip_without_real_comfyui_url(), None)
        return
    process = StandinProcess(tmp_path_factory.mktemp("comfy") / "base", models=MODELS)
    process.start()
    yield Backend("standin", process.url, process)
    process.stop()


@pytest.fixture
def standin(backend: Backend) -> Iterator[StandinProcess]:
    """The stand-in with default knobs; skips on a real ComfyUI."""
    if backend.standin is None:
        machine.skip_on_real_comfyui("the test needs the stand-in's fault injection")
    backend.standin.configure(reset=True)
    yield backend.standin
    backend.standin.configure(reset=True)


def run(factory: Callable[[ComfyClient], Awaitable[Any]], url: str, **client_args: Any) -> Any:
    async def main() -> Any:
        async with ComfyClient(url, **client_args) as client:
            return await factory(client)

    return asyncio.run(main())


# --- graphs (weight-free core nodes) --------------------------------------------------


def uid() -> str:
    return uuid.uuid4().hex[:10]


def color() -> int:
    return random.randrange(1, 0xFFFFFF)  # a fresh colour: ComfyUI would serve a cached result


def invert_graph(image: str, prefix: str) -> Graph:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def empty_graph(prefix: str, width: int = 32, height: int = 32, batch: int = 1) -> Graph:
    empty = {"width": width, "height": height, "batch_size": batch, "color": color()}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def save_video_codec_key(url: str) -> str:
    """Where SaveVideo's codec goes: 0.33 has a `format` combo (auto|mp4) beside a `codec`
    dynamic combo; later masters nest it in a `format` dynamic combo as `format.codec`."""
    info = httpx.get(f"{url}/object_info/SaveVideo", timeout=10).json()["SaveVideo"]
    nested = info["input"]["required"]["format"][0] == "COMFY_DYNAMICCOMBO_V3"
    return "format.codec" if nested else "codec"


def video_graph(prefix: str, codec_key: str, frames: int = 8, size: int = 64) -> Graph:
    empty = {"width": size, "height": size, "batch_size": frames, "color": color()}
    save = {"video": ["2", 0], "filename_prefix": prefix, "format": "mp4", codec_key: "h264"}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "SaveVideo", "inputs": save},
    }


def slow_graph(backend: Backend, prefix: str) -> Graph:
    """A prompt that runs for a while: the stand-in's knob, or real work on a real ComfyUI."""
    if backend.standin is not None:
        backend.standin.configure(slow_nodes={"ImageInvert": 1.5})
        return empty_graph(prefix)
    return empty_graph(prefix, width=1024, height=1024, batch=8)


def png_bytes(pixels: list[tuple[int, int, int]], size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size)
    image.putdata(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def wait_running(client: ComfyClient, prompt_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = await client.queue()
        if any(item[1] == prompt_id for item in queue["queue_running"]):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} never ran")


async def queued_ids(client: ComfyClient) -> set[str]:
    queue = await client.queue()
    return {item[1] for item in queue["queue_running"] + queue["queue_pending"]}


# --- the happy paths -----------------------------------------------------------------


def test_image_passthrough_inverts_pixels(backend: Backend, tmp_path: Path) -> None:
    pixels = [
        (random.randrange(256), random.randrange(256), random.randrange(256)) for _ in range(48)
    ]
    prefix = f"contract/{uid()}/inverted"

    async def scenario(client: ComfyClient) -> tuple[list[OutputFile], Any]:
        name = await client.upload(
            png_bytes(pixels, (8, 6)), f"in-{uid()}.png", subfolder="contract"
        )
        assert name.startswith("contract/")
        result = await client.run(invert_graph(name, prefix), timeout_s=60)
        for output in result.outputs:
            await client.download(output, tmp_path / output.filename)
        history = await client.history(result.prompt_id)
        for _ in range(100):  # deleted in the background, off the job's critical path
            if history is None:
                break
            await asyncio.sleep(0.02)
            history = await client.history(result.prompt_id)
        return result.outputs, history

    outputs, history_after = run(scenario, backend.url)
    assert [(o.node_id, o.kind_key, o.subfolder, o.type, o.media) for o in outputs] == [
        ("3", "images", prefix.rsplit("/", 1)[0], "output", "image")
    ]
    with Image.open(tmp_path / outputs[0].filename) as saved:
        got = list(saved.convert("RGB").get_flattened_data())
    want = [tuple(255 - c for c in p) for p in pixels]
    assert all(
        abs(a - b) <= 1 for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)
    )
    assert history_after is None, "run() deletes the history entry it consumed"


def probe_video(path: Path) -> dict[str, Any]:
    """codec, size and frame count: ffprobe if installed, else PyAV, else only the ftyp box."""
    if shutil.which("ffprobe"):
        command = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames"]
        command += ["-show_entries", "stream=codec_name,width,height,nb_read_frames", "-of", "json"]
        stream = json.loads(
            subprocess.run([*command, str(path)], capture_output=True, check=True).stdout
        )["streams"][0]
        return {
            "codec": stream["codec_name"],
            "size": (stream["width"], stream["height"]),
            "frames": int(stream["nb_read_frames"]),
        }
    try:
        import av
    except ImportError:
        return {"ftyp": path.read_bytes()[4:8] == b"ftyp"}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "codec": stream.codec_context.name,
            "size": (stream.width, stream.height),
            "frames": frames,
        }


def test_video_is_a_real_h264_mp4(backend: Backend, tmp_path: Path) -> None:
    prefix = f"contract/{uid()}/clip"
    graph = video_graph(prefix, save_video_codec_key(backend.url))

    async def scenario(client: ComfyClient) -> tuple[list[OutputFile], dict[str, Any]]:
        result = await client.run(graph, timeout_s=120, keep_history=True)
        await client.download(result.outputs[0], tmp_path / "clip.mp4")
        await client.delete_history(result.prompt_id)
        return result.outputs, result.history["outputs"]

    outputs, raw = run(scenario, backend.url)
    assert len(outputs) == 1
    video = outputs[0]
    assert (video.kind_key, video.media, video.filename.endswith(".mp4")) == (
        "images",
        "video",
        True,
    )
    assert video.subfolder == prefix.rsplit("/", 1)[0]
    assert raw["3"]["animated"] == [True], "core SaveVideo lists its file under images, animated"
    assert (tmp_path / "clip.mp4").read_bytes()[4:8] == b"ftyp"
    probe = probe_video(tmp_path / "clip.mp4")
    if "codec" in probe:
        assert probe == {"codec": "h264", "size": (64, 64), "frames": 8}


def test_expected_outputs_come_from_the_websocket(backend: Backend) -> None:
    """With `expect_outputs`, a success is concluded from the `executed` events alone: no
    `/history` read, and the same outputs and status messages the history entry holds."""
    graph = video_graph(f"contract/{uid()}/ws", save_video_codec_key(backend.url))

    async def scenario(client: ComfyClient) -> tuple[Any, Any]:
        result = await client.run(graph, timeout_s=120, keep_history=True, expect_outputs=["3"])
        entry = await client.history(result.prompt_id)
        await client.delete_history(result.prompt_id)
        return result, entry

    result, entry = run(scenario, backend.url)
    assert result.history.get("from_websocket") is True
    assert entry is not None
    assert result.history["outputs"] == entry["outputs"]
    assert [m[0] for m in result.history["status"]["messages"]] == [
        m[0] for m in entry["status"]["messages"]
    ]
    assert [o.filename for o in result.outputs] == [o.filename for o in ComfyClient.outputs(entry)]
    if backend.standin is not None:  # the one read is ours, after the run
        assert backend.standin.stats()["history_reads"].count(result.prompt_id) == 1


def test_progress_callbacks_arrive(backend: Backend) -> None:
    seen: list[ComfyProgress] = []

    async def on_progress(progress: ComfyProgress) -> None:
        seen.append(progress)

    run(
        lambda c: c.run(empty_graph(f"contract/{uid()}"), on_progress=on_progress, timeout_s=60),
        backend.url,
    )
    started = [p.node_type for p in seen if p.value == 0]
    assert started == ["EmptyImage", "ImageInvert", "SaveImage"]
    assert {p.nodes_total for p in seen} == {3}
    assert [p.nodes_done for p in seen if p.value == 0] == [0, 1, 2]


def test_same_graph_twice_is_served_from_comfyui_cache(backend: Backend) -> None:
    """ComfyUI caches node outputs: the second run executes nothing and reports the old file."""
    graph = empty_graph(f"contract/{uid()}/cached")

    async def scenario(client: ComfyClient) -> tuple[Any, Any]:
        return await client.run(graph, timeout_s=60), await client.run(graph, timeout_s=60)

    first, second = run(scenario, backend.url)
    assert first.cached_nodes == []
    if backend.standin is None and not second.cached_nodes:
        machine.skip_on_real_comfyui("it runs without its node cache (--cache-none)")
    assert sorted(second.cached_nodes) == ["1", "2", "3"]
    assert second.outputs == first.outputs


# --- refusals and failures -------------------------------------------------------------


VALIDATION_CASES: list[tuple[str, Callable[[str], Graph], str, str]] = [
    (
        "missing required input",
        lambda u: {
            **empty_graph(u),
            "1": {"class_type": "EmptyImage", "inputs": {"height": 8, "batch_size": 1, "color": 0}},
        },
        "node 1 (EmptyImage) input 'width'",
        "required_input_missing",
    ),
    (
        "value below min",
        lambda u: {
            **empty_graph(u),
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0},
            },
        },
        "node 1 (EmptyImage) input 'width': Value 0 smaller than min of 1",
        "value_smaller_than_min",
    ),
    (
        "value not in combo list",
        lambda u: {
            **empty_graph(u),
            "2": {
                "class_type": "ImageScale",
                "inputs": {
                    "image": ["1", 0],
                    "upscale_method": "bogus",
                    "width": 8,
                    "height": 8,
                    "crop": "disabled",
                },
            },
        },
        "node 2 (ImageScale) input 'upscale_method': Value not in list",
        "value_not_in_list",
    ),
    (
        "upload missing",
        lambda u: invert_graph(f"missing-{u}.png", u),
        "node 1 (LoadImage) input 'image': Custom validation failed for node "
        "(image - Invalid image file: missing-",
        "custom_validation_failed",
    ),
    (
        "link to a missing node",
        lambda u: {
            **empty_graph(u),
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["99", 0]}},
        },
        "node 2 (ImageInvert) input 'images': Exception when validating inner node",
        "exception_during_inner_validation",
    ),
    (
        "unknown node class",
        lambda u: {**empty_graph(u), "2": {"class_type": "NoSuchNode", "inputs": {}}},
        "node 2 (NoSuchNode): Node 'NoSuchNode' not found",
        "missing_node_type",
    ),
    (
        "no output node",
        lambda u: {"1": empty_graph(u)["1"]},
        "Prompt has no outputs",
        "prompt_no_outputs",
    ),
]


def test_validation_errors_name_node_class_and_input(backend: Backend) -> None:
    async def scenario(client: ComfyClient) -> list[ComfyValidationError]:
        found = []
        for _, make, _, _ in VALIDATION_CASES:
            with pytest.raises(ComfyValidationError) as caught:
                await client.run(make(f"contract/{uid()}"), timeout_s=30)
            found.append(caught.value)
        assert await queued_ids(client) == set()
        return found

    errors = run(scenario, backend.url)
    for (label, _, fragment, error_type), error in zip(VALIDATION_CASES, errors, strict=True):
        assert isinstance(error, InvalidInput)
        assert (error.code, error.status_code) == ("workflow_invalid", 422)
        assert fragment in error.message, (label, error.message)
        types = {p["type"] for n in error.details["node_errors"].values() for p in n["errors"]}
        assert error_type in types | {error.details["error_type"]}, (label, error.details)


def test_node_failure_is_an_execution_error(standin: StandinProcess) -> None:
    standin.configure(
        fail_nodes={"ImageInvert": {"exception_type": "ValueError", "message": "boom"}}
    )

    async def scenario(client: ComfyClient) -> ComfyExecutionError:
        with pytest.raises(ComfyExecutionError) as caught:
            await client.run(empty_graph(f"contract/{uid()}"), timeout_s=30)
        assert await queued_ids(client) == set()
        return caught.value

    error = run(scenario, standin.url)
    assert isinstance(error, JobFailure)
    assert error.code == "comfy_execution_error"
    assert (error.details["node_id"], error.details["node_type"]) == ("2", "ImageInvert")
    assert error.details["exception_type"] == "ValueError"
    assert "node 2 (ImageInvert) failed: ValueError: boom" in error.message


def test_out_of_memory_unloads_models(standin: StandinProcess) -> None:
    oom = {
        "exception_type": "torch.OutOfMemoryError",
        "message": "CUDA out of memory. Tried to allocate 4.00 GiB",
    }
    standin.configure(fail_nodes={"ImageInvert": oom})

    with pytest.raises(ComfyOutOfMemory) as caught:
        run(lambda c: c.run(empty_graph(f"contract/{uid()}"), timeout_s=30), standin.url)
    assert caught.value.code == "out_of_memory"
    assert caught.value.details["node_id"] == "2"
    assert "ran out of GPU memory in node 2 (ImageInvert)" in caught.value.message
    assert {"unload_models": True, "free_memory": True} in standin.stats()["free"]


def test_server_crash_mid_run_is_backend_crashed(tmp_path: Path) -> None:
    process = StandinProcess(tmp_path / "base", knobs={"crash_nodes": ["ImageInvert"]})
    with process:
        started = time.monotonic()
        with pytest.raises(ComfyCrashed) as caught:
            run(lambda c: c.run(empty_graph("crash"), timeout_s=60), process.url)
        assert time.monotonic() - started < 10
        assert not process.alive
    assert caught.value.code == "backend_crashed"


def test_nobody_listening_is_backend_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ComfyUnavailable) as caught:
        run(lambda c: c.run(empty_graph("x"), timeout_s=5), url, connect_timeout_s=1)
    assert (caught.value.code, caught.value.status_code) == ("backend_unavailable", 503)


# --- cancel, interrupt, timeout --------------------------------------------------------


def test_cancel_pending_prompt_removes_only_it(backend: Backend) -> None:
    first_graph = slow_graph(backend, f"contract/{uid()}/first")
    first_id = str(uuid.uuid4())

    async def scenario(client: ComfyClient) -> Any:
        first = asyncio.create_task(client.run(first_graph, prompt_id=first_id, timeout_s=120))
        await wait_running(client, first_id)
        second_id = await client.queue_prompt(empty_graph(f"contract/{uid()}/second"))
        assert await client.cancel(second_id) is True
        assert await queued_ids(client) == {first_id}, "only the pending prompt was removed"
        result = await first
        await asyncio.sleep(0.2)
        assert await client.history(second_id) is None, "the canceled prompt never ran"
        return result

    try:
        result = run(scenario, backend.url)
    finally:
        if backend.standin is not None:
            backend.standin.configure(reset=True)
    assert {o.kind_key for o in result.outputs} == {"images"}  # one file per image of the batch


def test_cancel_running_prompt_interrupts_it(standin: StandinProcess) -> None:
    standin.configure(slow_nodes={"ImageInvert": 30})

    async def scenario(client: ComfyClient) -> float:
        prompt_id = str(uuid.uuid4())
        task = asyncio.create_task(
            client.run(empty_graph(f"contract/{uid()}"), prompt_id=prompt_id)
        )
        await wait_running(client, prompt_id)
        started = time.monotonic()
        assert await client.cancel(prompt_id) is True
        with pytest.raises(ComfyInterrupted) as caught:
            await task
        assert isinstance(caught.value, JobCanceled)
        assert caught.value.node_id == "2"
        assert await queued_ids(client) == set()
        return time.monotonic() - started

    assert run(scenario, standin.url) < 2.0
    assert [c["applied"] for c in standin.stats()["interrupt"]][-1] is True


def test_interrupt_of_another_prompt_id_is_ignored(standin: StandinProcess) -> None:
    standin.configure(slow_nodes={"ImageInvert": 0.5})

    async def scenario(client: ComfyClient) -> Any:
        prompt_id = str(uuid.uuid4())
        task = asyncio.create_task(
            client.run(empty_graph(f"contract/{uid()}"), prompt_id=prompt_id)
        )
        await wait_running(client, prompt_id)
        await client.interrupt(str(uuid.uuid4()))  # somebody else's prompt: must not stop ours
        return await task

    assert run(scenario, standin.url).outputs
    assert standin.stats()["interrupt"][-1]["applied"] is False


def test_cancelling_the_awaiting_task_interrupts_the_prompt(standin: StandinProcess) -> None:
    standin.configure(slow_nodes={"ImageInvert": 30})

    async def scenario(client: ComfyClient) -> set[str]:
        prompt_id = str(uuid.uuid4())
        task = asyncio.create_task(
            client.run(empty_graph(f"contract/{uid()}"), prompt_id=prompt_id)
        )
        await wait_running(client, prompt_id)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
        return await queued_ids(client)

    assert run(scenario, standin.url) == set()


def test_timeout_interrupts_and_fails(standin: StandinProcess) -> None:
    standin.configure(slow_nodes={"ImageInvert": 30})

    async def scenario(client: ComfyClient) -> tuple[ComfyTimeout, set[str]]:
        with pytest.raises(ComfyTimeout) as caught:
            await client.run(empty_graph(f"contract/{uid()}"), timeout_s=0.5)
        return caught.value, await queued_ids(client)

    error, left = run(scenario, standin.url)
    assert (error.code, left) == ("timeout", set())


# --- the completion race and the history ---------------------------------------------


async def raw_events(
    url: str, graph: Graph, until_null: bool = True
) -> tuple[list[tuple[str, dict[str, Any]]], list[Any]]:
    """Queue over plain HTTP and record our prompt's websocket events (and /history right
    after execution_success)."""
    client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
    events: list[tuple[str, dict[str, Any]]] = []
    history_at_success: list[Any] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{url}/ws?clientId={client_id}") as ws,
    ):
        body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        async with session.post(f"{url}/prompt", json=body) as response:
            assert response.status == 200, await response.text()
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            kind, payload = data["type"], data["data"]
            if kind == "status" or payload.get("prompt_id") != prompt_id:
                continue
            events.append((kind, payload))
            if kind == "execution_success":
                async with session.get(f"{url}/history/{prompt_id}") as response:
                    history_at_success.append(await response.json())
            if kind == "executing" and payload["node"] is None:
                break
        async with session.post(f"{url}/history", json={"delete": [prompt_id]}):
            pass
    return events, history_at_success


def test_event_sequence_matches_comfyui(backend: Backend) -> None:
    events, _ = asyncio.run(raw_events(backend.url, empty_graph(f"contract/{uid()}")))
    kinds = [k for k, _ in events if k not in ("progress", "progress_state")]
    assert kinds == [
        "execution_start",
        "execution_cached",
        "executing",
        "executing",
        "executing",
        "executed",
        "execution_success",
        "executing",
    ]
    executing = [d["node"] for k, d in events if k == "executing"]
    assert executing == ["1", "2", "3", None]
    executed = next(d for k, d in events if k == "executed")
    assert (executed["node"], executed["output"]["images"][0]["type"]) == ("3", "output")
    assert all("timestamp" in d for k, d in events if k.startswith("execution_"))


def test_standin_reproduces_the_history_race(standin: StandinProcess) -> None:
    standin.configure(history_delay_s=0.5)
    _, history = asyncio.run(raw_events(standin.url, empty_graph(f"contract/{uid()}")))
    assert history == [{}], "execution_success comes before the history entry"


def test_history_race_still_yields_outputs(standin: StandinProcess) -> None:
    standin.configure(history_delay_s=1.0)
    result = run(lambda c: c.run(empty_graph(f"contract/{uid()}/race"), timeout_s=30), standin.url)
    assert [o.kind_key for o in result.outputs] == ["images"]


def test_websocket_silence_falls_back_to_polling(standin: StandinProcess) -> None:
    """With events lost (a socket that stays open but says nothing), the poll finishes the job."""

    async def scenario(client: ComfyClient) -> Any:
        client._dispatch = lambda text: None  # drop every event
        return await client.run(empty_graph(f"contract/{uid()}/silent"), timeout_s=30)

    result = run(scenario, standin.url, poll_interval_s=0.2)
    assert result.outputs


def test_websocket_drop_mid_run_reconnects(standin: StandinProcess) -> None:
    """The socket drops while our prompt runs: we reconnect and still see its end by event."""
    standin.configure(slow_nodes={"ImageInvert": 1.0})

    async def scenario(client: ComfyClient) -> Any:
        prompt_id = str(uuid.uuid4())
        task = asyncio.create_task(
            client.run(empty_graph(f"contract/{uid()}"), prompt_id=prompt_id)
        )
        await wait_running(client, prompt_id)
        drop = httpx.post(f"{standin.url}/standin/drop_websockets", timeout=5).json()
        assert drop["closed"] >= 1
        return await task

    started = time.monotonic()
    result = run(scenario, standin.url, poll_interval_s=30)  # no poll could finish it in time
    assert time.monotonic() - started < 10
    assert [o.kind_key for o in result.outputs] == ["images"]


# --- the stand-in's HTTP surface -----------------------------------------------------


def test_view_refuses_path_traversal_and_upload_renames(backend: Backend) -> None:
    with httpx.Client(base_url=backend.url, timeout=10) as http:
        assert http.get("/view", params={"filename": "../secret.txt"}).status_code == 400
        traversal = {"filename": "x.png", "subfolder": "../../etc", "type": "output"}
        assert http.get("/view", params=traversal).status_code == 403
        assert http.get("/view", params={"filename": f"none-{uid()}.png"}).status_code == 404
        name = f"same-{uid()}.png"
        first = http.post(
            "/upload/image", files={"image": (name, b"one")}, data={"subfolder": "contract"}
        ).json()
        again = http.post(
            "/upload/image", files={"image": (name, b"one")}, data={"subfolder": "contract"}
        ).json()
        other = http.post(
            "/upload/image", files={"image": (name, b"two")}, data={"subfolder": "contract"}
        ).json()
        assert first == again == {"name": name, "subfolder": "contract", "type": "input"}
        assert other["name"] == name.replace(".png", " (1).png")
        view = http.get(
            "/api/view", params={"filename": name, "subfolder": "contract", "type": "input"}
        )
        assert view.content == b"one"
        assert set(http.get("/api/queue").json()) == {"queue_running", "queue_pending"}


def test_object_info_lists_configured_models(standin: StandinProcess) -> None:
    info = httpx.get(f"{standin.url}/object_info/CheckpointLoaderSimple", timeout=10).json()
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [
        "tiny-sd.safetensors"
    ]
    everything = httpx.get(f"{standin.url}/object_info", timeout=30).json()
    assert len(everything) > 800
    assert "SaveVideo" in everything
    assert httpx.get(f"{standin.url}/object_info/NoSuchNode", timeout=10).json() == {}


def sampler_graph(prefix: str, checkpoint: str, steps: int) -> Graph:
    sampler = {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "seed": random.randrange(1 << 32), "steps": steps, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "simple", "denoise": 1.0,
    }  # fmt: skip
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 96, "height": 64, "batch_size": 1},
        },
        "5": {"class_type": "KSampler", "inputs": sampler},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_model_nodes_run_as_fakes_with_sampler_progress(
    standin: StandinProcess, tmp_path: Path
) -> None:
    steps: list[tuple[int, int]] = []

    def on_progress(progress: ComfyProgress) -> None:
        if progress.node_type == "KSampler" and progress.value > 0:
            steps.append((progress.value, progress.max))

    async def scenario(client: ComfyClient) -> Path:
        graph = sampler_graph(f"contract/{uid()}/sampled", "tiny-sd.safetensors", steps=5)
        result = await client.run(graph, on_progress=on_progress, timeout_s=30)
        return await client.download(result.outputs[0], tmp_path / "sampled.png")

    image = run(scenario, standin.url)
    assert steps == [(i, 5) for i in range(1, 6)]
    with Image.open(image) as sampled:
        assert sampled.size == (96, 64)

    with pytest.raises(ComfyValidationError) as caught:
        run(lambda c: c.run(sampler_graph("x", "absent.safetensors", 2), timeout_s=10), standin.url)
    assert (
        "node 1 (CheckpointLoaderSimple) input 'ckpt_name': Value not in list"
        in caught.value.message
    )


# --- reading outputs -----------------------------------------------------------------


def test_outputs_reads_every_key_and_subfolder() -> None:
    entry = {
        "outputs": {
            "12": {
                "gifs": [
                    {
                        "filename": "talk_00001.mp4",
                        "subfolder": "",
                        "type": "output",
                        "format": "video/h264-mp4",
                    }
                ]
            },
            "9": {
                "images": [{"filename": "v_00001_.mp4", "subfolder": "video", "type": "output"}],
                "animated": [True],
            },
            "10": {"audio": [{"filename": "a_00001_.flac", "subfolder": "sfx", "type": "output"}]},
            "11": {
                "images": [{"filename": "p_00001_.png", "subfolder": "", "type": "temp"}],
                "text": ["hi"],
            },
        }
    }
    found = ComfyClient.outputs(entry)
    assert [(o.node_id, o.kind_key, o.relpath, o.media) for o in found] == [
        ("9", "images", "video/v_00001_.mp4", "video"),
        ("10", "audio", "sfx/a_00001_.flac", "audio"),
        ("12", "gifs", "talk_00001.mp4", "video"),
    ]
    assert [o.type for o in ComfyClient.outputs(entry, include_temp=True)].count("temp") == 1


# --- audio in videos, batch slicing (what the InfiniteTalk graphs use) ------------------


def wav_bytes(seconds: float, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A mono 16-bit PCM tone as a .wav file."""
    count = round(seconds * rate)
    tone = array(
        "h", (round(12000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(count))
    )
    if sys.byteorder == "big":
        tone.byteswap()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(tone.tobytes())
    return buffer.getvalue()


def probe_audio(path: Path) -> dict[str, Any]:
    """The first audio stream's codec, rate, channels and duration in seconds."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert stream.duration is not None
        assert stream.time_base is not None
        return {
            "codec": stream.codec_context.name,
            "rate": stream.sample_rate,
            "channels": stream.channels,
            "duration": float(stream.duration * stream.time_base),
        }


def test_video_with_audio_muxes_aac_cut_to_the_video(backend: Backend, tmp_path: Path) -> None:
    """CreateVideo's optional audio goes into SaveVideo's mp4 as AAC: a track shorter than
    the video whole (not padded), a longer one cut to the video (20 frames at 10 fps: 2 s)."""
    key = save_video_codec_key(backend.url)
    empty = {"width": 64, "height": 64, "batch_size": 20, "color": color()}

    async def scenario(client: ComfyClient) -> list[OutputFile]:
        graph: Graph = {"1": {"class_type": "EmptyImage", "inputs": empty}}
        for node, seconds in ((2, 1.3), (3, 3.0)):
            name = await client.upload(wav_bytes(seconds), f"tone-{uid()}.wav", subfolder="jobs")
            save = {"filename_prefix": f"contract/{uid()}/talk", "format": "mp4", key: "h264"}
            graph |= {
                f"{node}": {"class_type": "LoadAudio", "inputs": {"audio": name}},
                f"{node}0": {
                    "class_type": "CreateVideo",
                    "inputs": {"images": ["1", 0], "fps": 10.0, "audio": [f"{node}", 0]},
                },
                f"{node}1": {
                    "class_type": "SaveVideo",
                    "inputs": {"video": [f"{node}0", 0], **save},
                },
            }
        result = await client.run(graph, timeout_s=120)
        for output in result.outputs:
            await client.download(output, tmp_path / f"{output.node_id}.mp4")
        return result.outputs

    outputs = run(scenario, backend.url)
    assert [o.node_id for o in outputs] == ["21", "31"]
    for output, seconds in zip(outputs, (1.3, 2.0), strict=True):
        path = tmp_path / f"{output.node_id}.mp4"
        probe = probe_video(path)
        if "codec" in probe:
            assert probe == {"codec": "h264", "size": (64, 64), "frames": 20}
        audio = probe_audio(path)
        assert audio == {**audio, "codec": "aac", "rate": 16000, "channels": 1}
        assert abs(audio["duration"] - seconds) < 0.01, audio


def test_image_batch_and_image_from_batch_pick_the_right_frames(
    backend: Backend, tmp_path: Path
) -> None:
    """ImageBatch appends image2 (resized to image1's size); ImageFromBatch slices with
    ComfyUI's clamping: a start past the end is the last frame, a negative one counts back."""
    red, green, blue, yellow = 0xFF0000, 0x00FF00, 0x0000FF, 0xFFFF00

    def empty(rgb: int, batch: int, width: int = 48, height: int = 48) -> dict[str, Any]:
        inputs = {"width": width, "height": height, "batch_size": batch, "color": rgb}
        return {"class_type": "EmptyImage", "inputs": inputs}

    def batch(first: str, second: str) -> dict[str, Any]:
        return {"class_type": "ImageBatch", "inputs": {"image1": [first, 0], "image2": [second, 0]}}

    def pick(index: int, length: int) -> dict[str, Any]:
        inputs = {"image": ["5", 0], "batch_index": index, "length": length}
        return {"class_type": "ImageFromBatch", "inputs": inputs}

    def save(images: str) -> dict[str, Any]:
        inputs = {"images": [images, 0], "filename_prefix": f"contract/{uid()}/batch"}
        return {"class_type": "SaveImage", "inputs": inputs}

    graph: Graph = {
        "1": empty(red, 9),
        "2": empty(green, 2),
        "3": empty(blue, 1, 32, 16),  # another size: resized into the batch
        "4": batch("1", "2"),
        "5": batch("4", "3"),  # 12 frames: 9 red, 2 green, 1 blue
        "6": pick(9, 100),  # green, green, blue
        "7": empty(yellow, 5, 64, 64),
        "8": batch("7", "6"),
        "9": save("8"),
        "10": pick(-3, 1),  # green
        "11": pick(40, 2),  # blue
        "12": batch("10", "11"),
        "13": save("12"),
    }

    async def scenario(client: ComfyClient) -> list[OutputFile]:
        result = await client.run(graph, timeout_s=60)
        for output in result.outputs:
            await client.download(output, tmp_path / f"{output.node_id}-{output.filename}")
        return result.outputs

    outputs = run(scenario, backend.url)

    def colours(node: str) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
        found = []
        for output in (o for o in outputs if o.node_id == node):
            image = Image.open(tmp_path / f"{node}-{output.filename}").convert("RGB")
            low, high = zip(*image.getextrema(), strict=True)
            assert all(h - lo <= 1 for lo, h in zip(low, high, strict=True)), "a solid colour"
            found.append((image.size, tuple(high)))
        return found

    rgb = {c: ((c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF) for c in (red, green, blue, yellow)}
    assert colours("9") == [((64, 64), rgb[yellow])] * 5 + [
        ((64, 64), rgb[green]),
        ((64, 64), rgb[green]),
        ((64, 64), rgb[blue]),
    ]
    assert colours("13") == [((48, 48), rgb[green]), ((48, 48), rgb[blue])]


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def test_infinitetalk_graph_runs_its_real_nodes_on_fake_frames(tmp_path: Path) -> None:
    """Two InfiniteTalk windows with fake model nodes: each VAEDecode yields `length`
    frames, the second window drops its `trim_image` motion frames with ImageFromBatch,
    ImageBatch joins the windows, and the loaded audio ends up in the mp4."""
    models = {
        "diffusion_models": ["wan.safetensors"],
        "model_patches": ["talk.safetensors"],
        "text_encoders": ["umt5.safetensors"],
        "vae": ["vae.safetensors"],
        "audio_encoders": ["wav2vec2.safetensors"],
    }
    shared: Graph = {
        "1": node("UNETLoader", unet_name="wan.safetensors", weight_dtype="default"),
        "2": node("ModelPatchLoader", name="talk.safetensors"),
        "3": node("CLIPLoader", clip_name="umt5.safetensors", type="wan"),
        "4": node("CLIPTextEncode", text="talking", clip=["3", 0]),
        "5": node("ConditioningZeroOut", conditioning=["4", 0]),
        "6": node("VAELoader", vae_name="vae.safetensors"),
        "7": node("AudioEncoderLoader", audio_encoder_name="wav2vec2.safetensors"),
        "9": node("AudioEncoderEncode", audio_encoder=["7", 0], audio=["8", 0]),
        "10": node("EmptyImage", width=80, height=60, batch_size=1, color=0x336699),
        "11": node("KSamplerSelect", sampler_name="euler"),
        "12": node("RandomNoise", noise_seed=7),
    }

    def window(first: int, **previous: Any) -> Graph:
        talk, sched, guider, sampler, decode = (str(first + i) for i in range(5))
        return {
            talk: node(
                "WanInfiniteTalkToVideo",
                mode="single_speaker",
                model=["1", 0],
                model_patch=["2", 0],
                positive=["4", 0],
                negative=["5", 0],
                vae=["6", 0],
                width=64,
                height=48,
                length=13,
                audio_encoder_output_1=["9", 0],
                motion_frame_count=5,
                audio_scale=1.0,
                start_image=["10", 0],
                **previous,
            ),
            sched: node(
                "BasicScheduler", model=[talk, 0], scheduler="simple", steps=2, denoise=1.0
            ),
            guider: node(
                "CFGGuider", model=[talk, 0], positive=[talk, 1], negative=[talk, 2], cfg=1.0
            ),
            sampler: node(
                "SamplerCustomAdvanced",
                noise=["12", 0],
                guider=[guider, 0],
                sampler=["11", 0],
                sigmas=[sched, 0],
                latent_image=[talk, 3],
            ),
            decode: node("VAEDecode", samples=[sampler, 0], vae=["6", 0]),
        }

    process = StandinProcess(tmp_path / "base", models=models)
    with process:
        save = {"filename_prefix": "talk/out", "format": "mp4"}
        save[save_video_codec_key(process.url)] = "h264"

        async def scenario(client: ComfyClient) -> Path:
            name = await client.upload(wav_bytes(1.3), "voice.wav", subfolder="jobs")
            graph = shared | window(20) | window(30, previous_frames=["24", 0])
            graph |= {
                "8": node("LoadAudio", audio=name),
                "40": node("ImageFromBatch", image=["34", 0], batch_index=["30", 4], length=4096),
                "41": node("ImageBatch", image1=["24", 0], image2=["40", 0]),
                "42": node("CreateVideo", images=["41", 0], fps=25.0, audio=["8", 0]),
                "43": node("SaveVideo", video=["42", 0], **save),
            }
            result = await client.run(graph, timeout_s=60)
            return await client.download(result.outputs[0], tmp_path / "talk.mp4")

        path = run(scenario, process.url)
    probe = probe_video(path)
    if "codec" in probe:
        assert probe == {"codec": "h264", "size": (64, 48), "frames": 13 + 13 - 5}
    audio = probe_audio(path)
    assert (audio["codec"], audio["rate"]) == ("aac", 16000)
    assert abs(audio["duration"] - 21 / 25) < 0.01, "cut to the video's 0.84 s"
