"""A custom workflow whose images come over ComfyUI's websocket (`SaveImageWebsocket`,
ComfyUI's custom_nodes/websocket_image_save.py) has them as its outputs, the same images
a client talking to that ComfyUI directly receives (the way ComfyUI's
script_examples/websockets_api_example_ws_images.py reads them). On the stand-in, and on
a real ComfyUI when COMFYUI_TEST_DIR is set."""

from __future__ import annotations

import asyncio
import io
import random
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
from PIL import Image

from fastwan.service import MANIFEST
from model_service.provision import Manifest
from model_service_testing import machine
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.machine import COMFYUI_TEST_DIR
from model_service_testing.process import ServiceProcess, tiny_comfy_process, wait_status

MODELS = {file.folder: [file.name] for file in Manifest.load(MANIFEST).files}
OPEN = {"ALLOW_CUSTOM_WORKFLOWS": "1"}
Graph = dict[str, Any]


def ws_graph(colour: int, *, with_save_image: bool = False) -> Graph:
    empty = {"width": 48, "height": 32, "batch_size": 2, "color": colour}
    graph: Graph = {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "4": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
    }
    if with_save_image:
        save = {"images": ["1", 0], "filename_prefix": "plain"}
        graph["3"] = {"class_type": "SaveImage", "inputs": save}
    return graph


@pytest.fixture(scope="module", params=["standin", "real"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, str]]:
    """The service, and the URL of its ComfyUI (to ask it directly)."""
    root = tmp_path_factory.mktemp(f"ws-{request.param}")
    if request.param == "real":
        if not COMFYUI_TEST_DIR:
            pytest.skip(machine.WHY_NO_REAL_COMFYUI)
        process = tiny_comfy_process(root, "fastwan2.2-5b-packed", COMFYUI_TEST_DIR, env=OPEN)
        process.start(timeout=240)
        yield process, f"http://127.0.0.1:{process.env['COMFYUI_PORT']}"
        process.stop()
        return
    with StandinProcess(root / "comfy", models=MODELS) as standin:
        process = ServiceProcess(
            "model_service.cli",
            root / "data",
            env={"COMFYUI_URL": standin.url, "CANCEL_GRACE_S": "3", **OPEN},
            args=["serve", "fastwan2.2-5b-packed"],
        )
        process.start(timeout=60)
        yield process, standin.url
        process.stop()


def run(client: httpx.Client, graph: Graph) -> dict[str, Any]:
    response = client.post(
        "/v1/jobs", json={"input": {"workflow": graph}}, headers={"Prefer": "wait=60"}
    )
    assert response.status_code in (200, 202), response.text
    job = wait_status(client, response.json()["id"], {"succeeded", "failed", "canceled"}, 60)
    assert job["status"] == "succeeded", job["error"]
    return job


async def direct_images(comfy_url: str, graph: Graph, node: str) -> list[bytes]:
    """The images `node` sends while it runs, read straight from ComfyUI's websocket as
    ComfyUI's own example does: binary frames after `executing` names the node, bytes 8 on."""
    client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
    ws_url = comfy_url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    images: list[bytes] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url, max_msg_size=0) as ws,
    ):
        body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        async with session.post(f"{comfy_url}/prompt", json=body) as answer:
            assert answer.status == 200, await answer.text()
        current = None
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                event = message.json()
                data = event.get("data") or {}
                if event.get("type") == "executing" and data.get("prompt_id") == prompt_id:
                    current = data.get("node")
                    if current is None:
                        break
            elif message.type == aiohttp.WSMsgType.BINARY and current == node:
                assert struct.unpack(">II", message.data[:8]) == (1, 2)  # PREVIEW_IMAGE, PNG
                images.append(message.data[8:])
        await session.post(f"{comfy_url}/history", json={"delete": [prompt_id]})
    return images


def rgb_of(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_websocket_images_are_the_jobs_outputs(service: tuple[ServiceProcess, str]) -> None:
    process, comfy_url = service
    colour = random.randrange(1, 0xFFFFFF)
    with process.client() as client:
        job = run(client, ws_graph(colour))
        assert [o["name"] for o in job["outputs"]] == ["node4.png", "node4_1.png"]
        ours = [client.get(o["url"]).content for o in job["outputs"]]
    direct = asyncio.run(direct_images(comfy_url, ws_graph(colour), "4"))
    assert len(direct) == 2
    inverted = 255 - np.array([(colour >> 16) & 0xFF, (colour >> 8) & 0xFF, colour & 0xFF])
    for mine, theirs in zip(ours, direct, strict=True):
        assert rgb_of(mine).shape == (32, 48, 3)
        assert np.abs(rgb_of(mine).astype(int) - inverted).max() <= 1  # floats, truncated
        assert mine == theirs  # the very bytes ComfyUI sends


def test_websocket_and_file_outputs_together(service: tuple[ServiceProcess, str]) -> None:
    process, _ = service
    colour = random.randrange(1, 0xFFFFFF)
    with process.client() as client:
        job = run(client, ws_graph(colour, with_save_image=True))
        names = [o["name"] for o in job["outputs"]]
        assert names == ["node3.png", "node3_1.png", "node4.png", "node4_1.png"]
        plain = rgb_of(client.get(job["outputs"][0]["url"]).content)
        sent = rgb_of(client.get(job["outputs"][2]["url"]).content)
    assert np.abs(plain.astype(int) + sent - 255).max() <= 1
