"""Images that ComfyUI sends over the websocket (`SaveImageWebsocket`): our client keeps
the ones an output node sends and drops a sampler's latent previews (the same binary
frames). On the stand-in (a separate process), and on a real ComfyUI 0.33 when
`COMFYUI_TEST_URL` is set (its checkout's `custom_nodes` has the node)."""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model_service.comfy import ComfyClient, OutputFile
from model_service.comfy import client as client_module
from model_service.comfy.client import _image_frame
from model_service.comfy.errors import ComfyOutputMissing
from model_service_testing import machine
from model_service_testing.comfy_standin import StandinProcess

MODELS = {"checkpoints": ["tiny-sd.safetensors"]}
Graph = dict[str, Any]


@pytest.fixture(scope="module", params=["standin", "real"])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "real":
        yield machine.skip_without_real_comfyui_url()
        return
    with StandinProcess(tmp_path_factory.mktemp("comfy") / "base", models=MODELS) as process:
        yield process.url


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinProcess]:
    with StandinProcess(tmp_path_factory.mktemp("comfy") / "base", models=MODELS) as process:
        yield process


def run(url: str, scenario: Callable[[ComfyClient], Awaitable[Any]], **client_args: Any) -> Any:
    async def main() -> Any:
        async with ComfyClient(url, **client_args) as client:
            return await scenario(client)

    return asyncio.run(main())


def ws_graph(colour: int, batch: int = 2) -> Graph:
    empty = {"width": 40, "height": 24, "batch_size": batch, "color": colour}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
    }


def sampler_graph(steps: int, seed: int) -> Graph:
    """A model graph whose sampler sends latent previews (with the `previews` knob)."""
    sampler = {
        "model": ["1", 0],
        "positive": ["2", 0],
        "negative": ["2", 0],
        "latent_image": ["3", 0],
        "seed": seed,
        "steps": steps,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
    }
    return {
        "1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": MODELS["checkpoints"][0]},
        },
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}},
        "3": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 96, "height": 64, "batch_size": 1},
        },
        "4": {"class_type": "KSampler", "inputs": sampler},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["5", 0]}},
    }


def rgb(colour: int) -> tuple[int, int, int]:
    return (colour >> 16) & 0xFF, (colour >> 8) & 0xFF, colour & 0xFF


def pixels(output: OutputFile) -> np.ndarray:
    assert output.data is not None
    assert output.data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(output.data)) as image:
        return np.asarray(image.convert("RGB"))


def test_saved_images_are_outputs_in_order(url: str) -> None:
    """Each image of the batch is one PNG output of the node that sent it, and with the
    node expected, its frames end the run without a `/history` read."""
    colour = random.randrange(1, 0xFFFFFF)

    async def scenario(client: ComfyClient) -> Any:
        return await client.run(ws_graph(colour), timeout_s=60, expect_outputs=["3"])

    result = run(url, scenario)
    assert [(o.node_id, o.type, o.filename) for o in result.outputs] == [
        ("3", "websocket", "SaveImageWebsocket_00001_.png"),
        ("3", "websocket", "SaveImageWebsocket_00002_.png"),
    ]
    inverted = 255 - np.array(rgb(colour))
    for output in result.outputs:
        image = pixels(output)
        assert image.shape == (24, 40, 3)
        assert np.abs(image.astype(int) - inverted).max() <= 1  # ComfyUI: floats, truncated
    assert result.history.get("from_websocket") is True


def test_without_expected_outputs_the_known_node_still_counts(url: str) -> None:
    result = run(url, lambda c: c.run(ws_graph(0x102030, batch=1), timeout_s=60))
    assert [o.filename for o in result.outputs] == ["SaveImageWebsocket_00001_.png"]
    inverted = 255 - np.array([0x10, 0x20, 0x30])
    assert np.abs(pixels(result.outputs[0]).astype(int) - inverted).max() <= 1


def test_latent_previews_are_not_outputs(standin: StandinProcess) -> None:
    """A sampler's preview frames come in the same shape as SaveImageWebsocket's images;
    only those sent while the output node runs are outputs."""
    standin.configure(reset=True, previews=True)
    frames: list[bytes] = []

    async def scenario(client: ComfyClient) -> Any:
        keep = client._binary

        def spy(frame: bytes) -> None:
            frames.append(frame)
            keep(frame)

        client._binary = spy  # type: ignore[method-assign]
        first = await client.run(sampler_graph(3, seed=1), timeout_s=60, expect_outputs=["6"])
        second = await client.run(sampler_graph(3, seed=2), timeout_s=60)
        return first, second

    try:
        first, second = run(standin.url, scenario)
    finally:
        standin.configure(reset=True)
    previews = [f for f in frames if f[:8] == struct.pack(">II", 1, 1)]  # JPEG previews
    assert len(previews) == 6  # 3 steps, 2 runs: they did come
    for result in (first, second):
        [output] = result.outputs
        assert (output.node_id, output.filename) == ("6", "SaveImageWebsocket_00001_.png")
        assert pixels(output).shape == (64, 96, 3)


def test_lost_websocket_while_images_are_sent_fails_the_run(standin: StandinProcess) -> None:
    """Frames sent while the socket was down are gone for good: no silent short output."""
    standin.configure(reset=True, slow_nodes={"ImageInvert": 1.0})

    async def scenario(client: ComfyClient) -> Any:
        prompt_id = str(uuid.uuid4())
        task = asyncio.create_task(
            client.run(ws_graph(0x445566), prompt_id=prompt_id, expect_outputs=["3"])
        )
        while not any(item[1] == prompt_id for item in (await client.queue())["queue_running"]):
            await asyncio.sleep(0.02)
        assert httpx.post(f"{standin.url}/standin/drop_websockets", timeout=5).json()["closed"]
        return await task

    try:
        with pytest.raises(ComfyOutputMissing, match="images sent over it may be lost"):
            run(standin.url, scenario)
    finally:
        standin.configure(reset=True)


def test_frame_layouts() -> None:
    """ComfyUI 0.33.0: PREVIEW_IMAGE (1) with a format word (server.py `send_image`), and
    PREVIEW_IMAGE_WITH_METADATA (4) with a JSON header (for clients that ask for it)."""
    png = b"\x89PNG\r\n\x1a\nrest"
    assert _image_frame(struct.pack(">II", 1, 2) + png) == {"image": png, "suffix": ".png"}
    assert _image_frame(struct.pack(">II", 1, 1) + b"jpeg") == {"image": b"jpeg", "suffix": ".jpg"}
    meta = json.dumps({"node_id": "7", "prompt_id": "p", "image_type": "image/png"}).encode()
    framed = struct.pack(">II", 4, len(meta)) + meta + png
    assert _image_frame(framed) == {"image": png, "suffix": ".png", "node": "7", "prompt_id": "p"}
    assert _image_frame(struct.pack(">I", 3) + b"text event") is None  # BinaryEventTypes.TEXT
    assert _image_frame(struct.pack(">II", 1, 9) + png) is None  # an unknown format
    assert _image_frame(b"\x00\x00") is None


def test_images_count_when_a_poll_ends_the_run(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our loop stalls while ComfyUI finishes (a busy machine): the wait for the next event
    times out and the poll finds the history entry; the frames already received (or still
    on their way) are outputs all the same."""
    first = True

    async def stalled(self: Any, timeout: float) -> Any:
        nonlocal first
        if first:
            first = False
            await asyncio.sleep(1.5)  # the prompt ends meanwhile; its events wait in the queue
            return None
        return await next_event(self, timeout)

    next_event = client_module._Watch.next
    monkeypatch.setattr(client_module._Watch, "next", stalled)
    result = run(url, lambda c: c.run(ws_graph(0x204060), timeout_s=60, expect_outputs=["3"]))
    assert [o.filename for o in result.outputs] == [
        "SaveImageWebsocket_00001_.png",
        "SaveImageWebsocket_00002_.png",
    ]
    assert "from_websocket" not in result.history  # the poll's entry, not the events'
