"""Long videos from the client and `msc`: chains and travels against a real FastWan
service, joins and redos against a real Wan2.2-14B service (each with its stand-in
ComfyUI as the backend), with an API key."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest
from typer.testing import CliRunner

from client_testing import KEY, png_bytes
from fastwan.service import MANIFEST
from model_service.provision import Manifest
from model_service_client import AsyncClient, Client, Job
from model_service_client.cli import app
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.media import mp4_bytes
from model_service_testing.process import ServiceProcess, place_sparse_models
from model_service_testing.pytest_plugin import StartComfyService, StartStandin
from wan14b.service import MANIFEST as WAN14B_MANIFEST

MODELS = {file.folder: [file.name] for file in Manifest.load(MANIFEST).files}
FRAMES = 9
BASE = {"prompt": "a boat", "width": 64, "height": 64, "num_frames": FRAMES, "fps": 8}
runner = CliRunner()


@pytest.fixture(scope="module")
def fastwan(comfy_standin: StartStandin, comfy_service: StartComfyService) -> ServiceProcess:
    standin: StandinProcess = comfy_standin(models=MODELS)
    return comfy_service("fastwan2.2-5b-packed", standin, env={"API_KEYS": KEY})


@pytest.fixture(scope="module")
def wan14b(comfy_standin: StartStandin, comfy_service: StartComfyService) -> ServiceProcess:
    standin: StandinProcess = comfy_standin()
    models = standin.base_dir / "models"
    place_sparse_models(models, Manifest.load(WAN14B_MANIFEST).files)  # "downloaded"
    env = {"API_KEYS": KEY, "MODELS_DIR": str(models)}
    return comfy_service("wan2.2-14b-loras-v1", standin, env=env)


@pytest.fixture
def client(fastwan: ServiceProcess) -> Iterator[Client]:
    with Client(fastwan.url, KEY, timeout=30) as c:
        yield c


def msc(service: ServiceProcess, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--url", service.url, "--key", KEY, *args])
    return result.exit_code, result.stdout, result.stderr


def frame_count(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def part_inputs(client: Client, job: Job) -> list[dict[str, Any]]:
    return [client.get(part["id"]).raw["input"] for part in job.raw["parts"]]


def test_client_chain_with_prompts_and_segments_then_download(
    client: Client, tmp_path: Path
) -> None:
    start = client.upload(png_bytes(size=64), filename="start.png")
    job = client.chain(
        {**BASE, "start_image": start, "seed": 100},
        ["a boat sails", {"prompt": "it docks", "seed": 7}],
        colour_correction=False,
        job_id="client-chain-1",
    )
    assert (job.id, job.raw["kind"]) == ("client-chain-1", "chain")
    done = client.wait(job.id, timeout=90, raise_on_failure=True)
    assert done.status == "succeeded"
    assert [p["seed"] for p in done.raw["parts"]] == [100, 7]
    assert [i["prompt"] for i in part_inputs(client, done)] == ["a boat sails", "it docks"]
    # repeating the PUT is safe: the same chain
    again = client.chain(
        {**BASE, "start_image": start, "seed": 100},
        ["a boat sails", {"prompt": "it docks", "seed": 7}],
        colour_correction=False,
        job_id="client-chain-1",
    )
    assert again.id == done.id
    (video,) = client.download(done, tmp_path)
    assert video.name == "video.mp4"
    assert frame_count(video.read_bytes()) == 2 * FRAMES - 1  # the join frame once


def test_client_interactive_chain_add_delete_finalize_reopen(client: Client) -> None:
    start = client.upload(png_bytes(size=64), filename="start.png")
    job = client.chain({**BASE, "start_image": start}, ["one"], interactive=True)
    assert client.wait(job.id, timeout=90).status == "awaiting_input"
    client.add_segments(job.id, ["two"])
    assert client.wait(job.id, timeout=90).status == "awaiting_input"
    assert len(client.delete_last_segment(job.id).raw["parts"]) == 1
    client.add_segments(job.id, [{"prompt": "two again", "seed": 5}])
    assert client.wait(job.id, timeout=90).status == "awaiting_input"
    client.finalize(job.id)
    done = client.wait(job.id, timeout=90)
    assert done.status == "succeeded"
    assert [i["prompt"] for i in part_inputs(client, done)] == ["one", "two again"]
    assert client.reopen(job.id).status == "awaiting_input"


def test_async_client_travel_uploads_local_images(fastwan: ServiceProcess, tmp_path: Path) -> None:
    red = tmp_path / "red.png"
    red.write_bytes(png_bytes((200, 40, 40), size=64))

    async def flow() -> Job:
        async with AsyncClient(fastwan.url, KEY) as client:
            green = await client.upload(png_bytes((40, 200, 40), size=64), filename="g.png")
            job = await client.travel(
                {**BASE, "seed": 3},
                [red, green, png_bytes((40, 40, 200), size=64)],  # a Path, an id, bytes
                prompts=["red", "green", "blue"],
                overlap=2,
            )
            assert job.raw["kind"] == "travel"
            done = await client.wait(job.id, timeout=90)
            files = await client.download(done, tmp_path / "out")
            assert frame_count(files[0].read_bytes()) == 3 * FRAMES - 2 * 2
            return done

    done = asyncio.run(flow())
    assert done.status == "succeeded"
    assert len(done.raw["parts"]) == 3


def test_msc_chain_uploads_the_start_image_waits_and_downloads(
    fastwan: ServiceProcess, client: Client, tmp_path: Path
) -> None:
    image = tmp_path / "start.png"
    image.write_bytes(png_bytes(size=64))
    code, out, err = msc(
        fastwan,
        "chain",
        json.dumps(BASE),
        "--file",
        f"start_image={image}",
        "--prompt",
        "first",
        "--prompt",
        "second",
        "--no-colour-correction",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    job = json.loads(out)  # stdout is the chain's JSON alone
    assert job["status"] == "succeeded"
    request = job["input"]  # the chain's request, as sent
    assert request["input"]["start_image"].startswith("upl_")
    assert [s["prompt"] for s in request["segments"]] == ["first", "second"]
    assert request["colour_correction"] is False
    parts = [client.get(part["id"]).raw["input"]["prompt"] for part in job["parts"]]
    assert parts == ["first", "second"]
    assert frame_count((tmp_path / "out" / "video.mp4").read_bytes()) == 2 * FRAMES - 1
    assert "video.mp4" in err  # the files written are reported on stderr

    code, out, err = msc(
        fastwan,
        "chain",
        json.dumps({**BASE, "start_image": request["input"]["start_image"]}),
        "--segment",
        '{"num_frames": 5, "seed": 9}',
        "--interactive",
        "--wait",
    )
    assert code == 0, err
    assert json.loads(out)["status"] == "awaiting_input"


def test_msc_travel_with_files_and_references(fastwan: ServiceProcess, tmp_path: Path) -> None:
    first = tmp_path / "a.png"
    first.write_bytes(png_bytes((200, 40, 40), size=64))
    with Client(fastwan.url, KEY) as client:
        second = client.upload(png_bytes((40, 200, 40), size=64), filename="b.png")
    code, out, err = msc(
        fastwan,
        "travel",
        json.dumps(BASE),
        "--image",
        str(first),
        "--image",
        second,
        "--prompt",
        "red",
        "--prompt",
        "green",
        "--overlap",
        "2",
        "--id",
        "msc-travel-1",
        "--wait",
    )
    assert code == 0, err
    job = json.loads(out)
    assert (job["id"], job["kind"], job["status"]) == ("msc-travel-1", "travel", "succeeded")
    assert len(job["parts"]) == 2
    request = job["input"]
    assert request["images"][0].startswith("upl_")  # the local file, uploaded
    assert (request["images"][1], request["prompts"], request["overlap"]) == (
        second,
        ["red", "green"],
        2,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["chain", "{}"], "a chain needs segments"),
        (["chain", "{}", "--prompt", "a", "--segment", "{}"], "not both"),
        (["chain", "{}", "--segment", "[1]"], "--segment must be a JSON object"),
        (["travel", "{}", "--image", "x"], "at least 2 images"),
    ],
)
def test_msc_long_video_usage_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["--url", "http://127.0.0.1:9", *args])
    assert result.exit_code == 1
    assert message in result.stderr


def test_msc_chain_reports_the_services_refusal(fastwan: ServiceProcess) -> None:
    code, _out, err = msc(fastwan, "chain", json.dumps(BASE), "--prompt", "no start image")
    assert code == 1
    assert "invalid_input (HTTP 422)" in err


def test_msc_join_uploads_local_clips_and_waits(wan14b: ServiceProcess, tmp_path: Path) -> None:
    clips = []
    for index, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        clips.append(tmp_path / f"clip{index}.mp4")
        clips[-1].write_bytes(mp4_bytes([colour] * FRAMES))
    code, out, err = msc(
        wan14b,
        "join",
        str(clips[0]),
        str(clips[1]),
        "--input",
        '{"seed": 4}',
        "-p",
        "a slow pan",
        "--bridge-frames",
        "3",
        "--wait",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    job = json.loads(out)
    assert (job["kind"], job["status"]) == ("join", "succeeded"), job
    assert [ref[:4] for ref in job["input"]["clips"]] == ["upl_", "upl_"]
    assert job["input"]["prompt"] == "a slow pan"
    assert frame_count((tmp_path / "out" / "video.mp4").read_bytes()) == 2 * FRAMES + 3


def test_async_client_redo_keeps_the_frame_count(wan14b: ServiceProcess) -> None:
    async def main() -> Job:
        async with AsyncClient(wan14b.url, KEY, timeout=30) as client:
            job = await client.redo(
                mp4_bytes([(90, 90, 90)] * FRAMES),
                2,
                4,
                prompt="it blinks",
                input={"seed": 2},
                wait_s=60,
            )
            return await client.wait(job.id)

    job = asyncio.run(main())
    assert (job.raw["kind"], job.status) == ("redo", "succeeded"), job.raw
    assert job.raw["info"]["frames"] == FRAMES
    assert job.raw["info"]["stretch"] == [2, 4]


def test_msc_join_reports_a_service_without_first_last_frame(
    fastwan: ServiceProcess, tmp_path: Path
) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(mp4_bytes([(9, 9, 9)] * 5))
    code, _out, err = msc(fastwan, "join", str(clip), str(clip), "-p", "x")
    assert code == 1
    assert "invalid_input (HTTP 422)" in err
    assert "first-last-frame" in err
