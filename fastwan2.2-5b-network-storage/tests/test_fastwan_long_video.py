"""Long videos on the FastWan service: chains and travel, end to end over HTTP, with the
stand-in ComfyUI as the backend. Its frames made from a start image start with that
image exactly, carry their index as a grey block in the top-left corner, and drift in
colour with the `drift` knob, so every join can be checked from the final mp4 alone.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from fastwan.service import MANIFEST
from model_service.provision import Manifest
from model_service.video.colour import colour_stats, drift
from model_service_testing.comfy_standin import StandinProcess
from model_service_testing.comfy_standin.nodes import index_block, index_level
from model_service_testing.media import mp4_bytes
from model_service_testing.process import (
    RedisServer,
    ServiceProcess,
    wait_status,
)
from model_service_testing.pytest_plugin import StartComfyService, StartStandin

if TYPE_CHECKING:
    from playwright.sync_api import Browser

MODELS = {file.folder: [file.name] for file in Manifest.load(MANIFEST).files}
SIZE, FRAMES = 64, 9
BASE = {"prompt": "a boat", "width": SIZE, "height": SIZE, "num_frames": FRAMES, "fps": 8}
CODE_TOLERANCE = 4  # grey levels lost by the index code to h264
Frame = npt.NDArray[np.uint8]


def gradient() -> Image.Image:
    ramp = np.arange(SIZE, dtype=np.uint8) * 3 + 20
    x, y = np.meshgrid(ramp, ramp)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 90)], axis=-1))


def solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), colour)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def standin(comfy_standin: StartStandin) -> StandinProcess:
    return comfy_standin(models=MODELS)


def fastwan(standin: StandinProcess, data: Path) -> ServiceProcess:
    return ServiceProcess(
        "model_service.cli",
        data,
        env={"COMFYUI_URL": standin.url, "CANCEL_GRACE_S": "3"},
        args=["serve", "fastwan2.2-5b-packed"],
    )


@pytest.fixture(scope="module")
def service(standin: StandinProcess, comfy_service: StartComfyService) -> ServiceProcess:
    return comfy_service("fastwan2.2-5b-packed", standin, env={"CANCEL_GRACE_S": "3"})


@pytest.fixture
def client(service: ServiceProcess, standin: StandinProcess) -> Iterator[httpx.Client]:
    standin.configure(reset=True)
    with service.client() as http:
        yield http


def chain_body(segments: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    return {
        "input": {**BASE, "start_image": data_uri(gradient()), "seed": 100},
        "segments": segments,
        "colour_correction": False,
        **options,
    }


def finished(client: httpx.Client, job_id: str, timeout: float = 90) -> dict[str, Any]:
    return wait_status(client, job_id, {"succeeded", "failed", "canceled"}, timeout)


def frames_of(client: httpx.Client, url: str) -> list[Frame]:
    response = client.get(url)
    assert response.status_code == 200, response.text
    with av.open(io.BytesIO(response.content)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def code_of(frame: Frame) -> float:
    """The mean grey level of the index block (top-left corner)."""
    side = index_block(SIZE, SIZE)
    return float(frame[2 : side - 2, 2 : side - 2].mean())


def video_url(job: dict[str, Any]) -> str:
    return next(out["url"] for out in job["outputs"] if out["name"] == "video.mp4")


def test_a_chain_without_a_size_takes_the_first_images_shape_for_every_part(
    client: httpx.Client,
) -> None:
    """Each part's own start image would round differently: the size is fixed once, from
    the chain's image, and every segment gets it."""
    body = {
        "input": {"prompt": "a boat", "num_frames": 5, "fps": 8, "seed": 1},
        "segments": [{}, {}],
        "colour_correction": False,
    }
    body["input"]["start_image"] = data_uri(Image.new("RGB", (480, 832), (90, 120, 200)))
    response = client.post("/v1/chains", json=body)
    assert response.status_code == 202, response.text
    chain = finished(client, response.json()["id"])
    assert chain["status"] == "succeeded", chain
    sizes = {
        (part["input"]["width"], part["input"]["height"])
        for part in (client.get(f"/v1/jobs/{p['id']}").json() for p in chain["parts"])
    }
    assert sizes == {(704, 1248)}
    frames = frames_of(client, video_url(chain))
    assert frames[0].shape[:2] == (1248, 704)


def test_chain_joins_drop_the_repeated_frame_and_seeds_differ(client: httpx.Client) -> None:
    response = client.post("/v1/chains", json=chain_body([{}, {"prompt": "waves"}, {"seed": 7}]))
    assert response.status_code == 202, response.text
    chain = response.json()
    assert chain["kind"] == "chain"
    assert len(chain["parts"]) == 3
    chain = finished(client, chain["id"])
    assert chain["status"] == "succeeded", chain
    parts = chain["parts"]
    assert [p["seed"] for p in parts] == [100, 101, 7]  # the input's seed + index, or its own
    assert all(p["status"] == "succeeded" and p["video"] for p in parts)
    assert chain["info"]["frames"] == 3 * FRAMES - 2  # one boundary frame per join dropped
    assert chain["progress"]["fraction"] == 1.0

    frames = frames_of(client, video_url(chain))
    assert len(frames) == 3 * FRAMES - 2
    # frame 0 is the start image; then every segment's frames 1..8 with their index codes
    expected = [index_level(i) for i in range(1, FRAMES)] * 3
    codes = [code_of(frame) for frame in frames[1:]]
    assert np.allclose(codes, expected, atol=CODE_TOLERANCE), codes
    start = np.asarray(gradient(), dtype=np.float64)
    assert np.abs(frames[0].astype(np.float64) - start).mean() < 4

    # the hand-off is lossless: segment 1 was made from segment 0's own last frame (PNG)
    first = client.get(f"/v1/jobs/{parts[0]['id']}").json()
    names = {out["name"] for out in first["outputs"]}
    assert {"video.mp4", "last_frame.png", "next_start.png"} <= names
    last_png = client.get(f"/v1/jobs/{parts[0]['id']}/outputs/last_frame.png").content
    handed = client.get(f"/v1/jobs/{parts[0]['id']}/outputs/next_start.png").content
    last = np.asarray(Image.open(io.BytesIO(last_png)).convert("RGB"))
    assert np.array_equal(last, np.asarray(Image.open(io.BytesIO(handed)).convert("RGB")))
    assert code_of(last) == index_level(FRAMES - 1)  # exact: no codec in between
    second = frames_of(client, parts[1]["video"])
    assert np.abs(second[0].astype(np.float64) - last).mean() < 4


def test_colour_correction_stops_drift_over_five_segments(
    client: httpx.Client, standin: StandinProcess
) -> None:
    standin.configure(drift=0.12)
    reference = colour_stats(np.asarray(gradient()))
    drifts = {}
    for correct in (False, True):
        body = chain_body([{}] * 5, colour_correction=correct)
        chain = finished(client, client.post("/v1/chains", json=body).json()["id"], 120)
        assert chain["status"] == "succeeded", chain
        frames = frames_of(client, video_url(chain))
        assert len(frames) == 5 * FRAMES - 4
        drifts[correct] = drift(colour_stats(frames[-1]), reference)
        if correct:
            per_part = [
                client.get(f"/v1/jobs/{p['id']}").json()["info"]["colour_drift"]
                for p in chain["parts"]
            ]
            assert all(d["after"] < d["before"] for d in per_part), per_part
    assert drifts[False] > 20, drifts  # the stand-in's drift compounds over the chain
    assert drifts[True] < drifts[False] / 4, drifts


def test_interactive_chain_add_delete_finalize_reopen(client: httpx.Client) -> None:
    chain = client.post("/v1/chains", json=chain_body([{}], interactive=True)).json()
    job_id = chain["id"]
    chain = wait_status(client, job_id, {"awaiting_input"})
    assert len(chain["parts"]) == 1
    assert chain["outputs"] == []

    added = client.post(f"/v1/chains/{job_id}/segments", json={"segments": [{"prompt": "x"}]})
    assert added.status_code == 200, added.text
    chain = wait_status(client, job_id, {"awaiting_input"})
    assert [p["status"] for p in chain["parts"]] == ["succeeded", "succeeded"]

    # not liked: delete the last segment and redo it with another seed
    deleted = client.delete(f"/v1/chains/{job_id}/segments/last")
    assert deleted.status_code == 200
    assert len(deleted.json()["parts"]) == 1
    redo = client.post(f"/v1/chains/{job_id}/segments", json={"segments": [{"seed": 5}]})
    assert redo.status_code == 200
    chain = wait_status(client, job_id, {"awaiting_input"})
    assert [p["seed"] for p in chain["parts"]] == [100, 5]

    assert client.post(f"/v1/chains/{job_id}/finalize").status_code == 200
    chain = finished(client, job_id)
    assert chain["status"] == "succeeded"
    assert chain["info"]["frames"] == 2 * FRAMES - 1

    wrong = client.post(f"/v1/chains/{job_id}/segments", json={"segments": [{}]})
    assert wrong.status_code == 409
    assert wrong.json()["error"]["code"] == "wrong_job_state"
    assert client.post(f"/v1/chains/{job_id}/reopen").json()["status"] == "awaiting_input"
    client.post(f"/v1/chains/{job_id}/segments", json={"segments": [{}]})
    wait_status(client, job_id, {"awaiting_input"})
    client.post(f"/v1/chains/{job_id}/finalize")
    chain = finished(client, job_id)
    assert chain["status"] == "succeeded"
    assert chain["info"]["frames"] == 3 * FRAMES - 2
    assert len(frames_of(client, video_url(chain))) == 3 * FRAMES - 2


def test_failed_segment_retry_keeps_completed_ones(
    client: httpx.Client, standin: StandinProcess
) -> None:
    # the latent node is slow, so that the failure is armed after segment 0 and before
    # segment 1 reaches its sampler
    standin.configure(slow_nodes={"Wan22ImageToVideoLatent": 1.0})
    job_id = client.post("/v1/chains", json=chain_body([{}, {}, {}])).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}.0").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    standin.configure(fail_nodes={"SamplerCustomAdvanced": {"message": "sampler broke"}})
    chain = finished(client, job_id)
    assert chain["status"] == "failed"
    assert chain["error"]["code"] == "part_failed"
    assert chain["error"]["part"] == 1
    assert "sampler broke" in chain["error"]["message"]
    assert [p["status"] for p in chain["parts"]] == ["succeeded", "failed", "canceled"]
    kept = client.get(f"/v1/jobs/{job_id}.0").json()

    standin.configure(reset=True)
    prompts_before = len(standin.stats()["prompts"])
    retried = client.post(f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 200, retried.text
    chain = finished(client, job_id)
    assert chain["status"] == "succeeded", chain
    assert chain["error"] is None
    assert chain["info"]["frames"] == 3 * FRAMES - 2
    assert client.get(f"/v1/jobs/{job_id}.0").json()["timings"] == kept["timings"]
    assert len(standin.stats()["prompts"]) - prompts_before == 2  # segments 1 and 2 only
    again = client.post(f"/v1/jobs/{job_id}/retry")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "wrong_job_state"


def test_cancel_cascades_to_every_part(client: httpx.Client, standin: StandinProcess) -> None:
    standin.configure(step_delay_s=0.5)
    job_id = client.post("/v1/chains", json=chain_body([{}, {}, {}])).json()["id"]
    wait_status(client, f"{job_id}.0", {"running"})
    canceled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert canceled.status_code == 200
    chain = finished(client, job_id)
    assert chain["status"] == "canceled"
    for part in chain["parts"]:
        assert finished(client, part["id"])["status"] == "canceled"


def test_travel_legs_cross_fade_exactly(client: httpx.Client) -> None:
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    overlap = 2
    body = {
        "input": {**BASE, "seed": 3},
        "images": [data_uri(solid(c)) for c in colours],
        "prompts": ["red", "green", "blue"],
        "overlap": overlap,
    }
    response = client.post("/v1/travels", json=body)
    assert response.status_code == 202, response.text
    travel = finished(client, response.json()["id"])
    assert travel["status"] == "succeeded", travel
    assert travel["kind"] == "travel"
    assert len(travel["parts"]) == 3
    frames = frames_of(client, video_url(travel))
    assert len(frames) == 3 * FRAMES - 2 * overlap
    centre = [f[SIZE // 2 :, SIZE // 2 :].reshape(-1, 3).mean(axis=0) for f in frames]
    for leg in range(2):
        join = (leg + 1) * (FRAMES - overlap)  # the first blended frame
        a, b = np.array(colours[leg]), np.array(colours[leg + 1])
        for j in range(overlap):
            w = (j + 1) / (overlap + 1)
            assert np.allclose(centre[join + j], (1 - w) * a + w * b, atol=6), (leg, j)
        assert np.allclose(centre[join - 1], a, atol=6)  # the frame before is leg's own
        assert np.allclose(centre[join + overlap], b, atol=6)


def test_bad_long_video_requests_are_422(client: httpx.Client) -> None:
    no_image = client.post("/v1/chains", json={"input": BASE, "segments": [{}]})
    assert no_image.status_code == 422
    assert no_image.json()["error"]["field"] == "input.start_image"
    bad_frames = client.post("/v1/chains", json=chain_body([{}, {"num_frames": 10}]))
    assert bad_frames.status_code == 422
    assert bad_frames.json()["error"]["field"].startswith("segments[1]")
    unknown = client.post("/v1/chains", json=chain_body([{"width": 128}]))
    assert unknown.status_code == 422  # a segment may not change the size
    prompts = client.post(
        "/v1/travels",
        json={"input": BASE, "images": [data_uri(solid((1, 2, 3)))] * 2, "prompts": ["a"]},
    )
    assert prompts.status_code == 422
    assert prompts.json()["error"]["field"] == "prompts"
    overlap = client.post(
        "/v1/travels",
        json={"input": BASE, "images": [data_uri(solid((1, 2, 3)))] * 2, "overlap": 5},
    )
    assert overlap.status_code == 422
    assert overlap.json()["error"]["field"] == "overlap"
    # FastWan has no last-frame conditioning: joins and redos are refused, saying where to go
    clip = "data:video/mp4;base64," + base64.b64encode(mp4_bytes([(9, 9, 9)] * 5)).decode()
    for route, body, field in (
        ("/v1/joins", {"input": BASE, "clips": [clip, clip]}, "clips"),
        ("/v1/redos", {"input": BASE, "video": clip, "start_frame": 1, "end_frame": 2}, "video"),
    ):
        refused = client.post(route, json=body)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_input", field)
        assert "first-last-frame" in error["message"]
        assert "Wan2.2-14B" in error["message"]


def test_restart_in_the_middle_of_a_chain_loses_nothing(
    standin: StandinProcess, tmp_path: Path
) -> None:
    standin.configure(reset=True, slow_nodes={"Wan22ImageToVideoLatent": 1.0})
    process = fastwan(standin, tmp_path / "data")
    process.start(timeout=60)
    try:
        with process.client() as client:
            job_id = client.post("/v1/chains", json=chain_body([{}, {}, {}])).json()["id"]
            wait_status(client, f"{job_id}.1", {"running"}, 60)
            # begun in ComfyUI, not only taken: a job killed before that is not counted
            deadline = time.monotonic() + 60
            while client.get(f"/v1/jobs/{job_id}.1").json()["timings"]["started_at"] is None:
                assert time.monotonic() < deadline, "segment 1 never began"
                time.sleep(0.05)
        process.kill9()
        standin.configure(reset=True)
        process.start(timeout=60)
        with process.client() as client:
            chain = finished(client, job_id, 120)
            assert chain["status"] == "succeeded", chain
            assert chain["info"]["frames"] == 3 * FRAMES - 2
            attempts = [
                client.get(f"/v1/jobs/{p['id']}").json()["attempts"] for p in chain["parts"]
            ]
            assert attempts == [1, 2, 1]  # segment 0 kept; segment 1 ran again
            assert len(frames_of(client, video_url(chain))) == 3 * FRAMES - 2
    finally:
        process.stop()


def pod_of(url: str, pods: list[ServiceProcess]) -> ServiceProcess:
    return next(pod for pod in pods if url.startswith(pod.url + "/"))


def test_in_a_fleet_long_videos_run_across_pods(standin: StandinProcess, tmp_path: Path) -> None:
    """Two FastWan pods (each with its own ComfyUI) on one Redis: a travel's legs run on
    both at once and are stitched once; a chain goes on after the pod that made its first
    segment stops: the next segment starts from that segment's last frame and the stitch
    uses its video, both kept by the fleet."""
    with (
        StandinProcess(tmp_path / "comfy-b", models=MODELS) as standin_b,
        RedisServer(tmp_path / "redis") as redis,
    ):
        pods = []
        for name, backend in (("a", standin), ("b", standin_b)):
            backend.configure(reset=True, slow_nodes={"Wan22ImageToVideoLatent": 1.0})
            pod = fastwan(backend, tmp_path / name)
            pod.env.update({"QUEUE_URL": redis.url, "POD_URL": pod.url, "QUEUE_HEARTBEAT_S": "3"})
            pods.append(pod.start(timeout=60))
        a, b = pods
        try:
            with a.client() as on_a, b.client() as on_b:
                plain = on_a.post("/v1/jobs", json={"input": {**BASE, "seed": 1}}).json()
                assert finished(on_b, plain["id"])["status"] == "succeeded"

                colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
                body = {
                    "input": {**BASE, "seed": 3},
                    "images": [data_uri(solid(c)) for c in colours],
                    "overlap": 2,
                }
                response = on_a.post("/v1/travels", json=body)
                assert response.status_code == 202, response.text
                travel = finished(on_b, response.json()["id"], 120)
                assert travel["status"] == "succeeded", travel
                legs = {pod_of(part["video"], pods).url for part in travel["parts"]}
                assert legs == {a.url, b.url}  # both pods ran legs
                frames = frames_of(on_b, video_url(travel))
                assert len(frames) == 4 * FRAMES - 3 * 2
                centre = frames[-1][SIZE // 2 :, SIZE // 2 :].reshape(-1, 3).mean(axis=0)
                assert np.allclose(centre, colours[-1], atol=6)
                composed = [
                    "long video composed" in line and travel["id"] in line
                    for pod in pods
                    for line in pod.log().splitlines()
                ]
                assert sum(composed) == 1, "the travel was stitched once, on one pod"

                # interactive: made on one pod, grown and finalized through the other
                job_id = on_a.post("/v1/chains", json=chain_body([{}], interactive=True)).json()[
                    "id"
                ]
                wait_status(on_b, job_id, {"awaiting_input"})
                added = on_b.post(f"/v1/chains/{job_id}/segments", json={"segments": [{}]})
                assert added.status_code == 200, added.text
                wait_status(on_a, job_id, {"awaiting_input"})
                assert on_b.post(f"/v1/chains/{job_id}/finalize").status_code == 200
                grown = finished(on_a, job_id)
                assert grown["status"] == "succeeded", grown
                assert len(frames_of(on_a, video_url(grown))) == 2 * FRAMES - 1

                # a cancel sent to one pod stops every part, wherever it runs
                job_id = on_a.post("/v1/chains", json=chain_body([{}, {}, {}])).json()["id"]
                running = wait_status(on_b, f"{job_id}.0", {"running"})
                assert running["status"] == "running"
                assert on_b.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
                assert finished(on_a, job_id)["status"] == "canceled"
                parts = [finished(on_a, f"{job_id}.{index}") for index in range(3)]
                assert [part["status"] for part in parts] == ["canceled"] * 3

                for backend in (standin, standin_b):
                    backend.configure(drift=0.12)
                chain_id = on_b.post(
                    "/v1/chains", json=chain_body([{}, {}, {}], colour_correction=True)
                ).json()["id"]
                first = finished(on_a, f"{chain_id}.0")
                assert first["status"] == "succeeded", first
                maker = pod_of(first["outputs"][0]["url"], pods)
                other = b if maker is a else a
                maker.stop()  # its files live on in the fleet's store
                with other.client() as client:
                    chain = finished(client, chain_id, 120)
                    assert chain["status"] == "succeeded", chain
                    later = [pod_of(part["video"], pods) for part in chain["parts"][1:]]
                    assert later == [other, other]
                    assert pod_of(video_url(chain), pods) is other
                    frames = frames_of(client, video_url(chain))
                    assert len(frames) == 3 * FRAMES - 2
                    # each segment's index codes rise (colour-corrected: not exact levels)
                    codes = [code_of(frame) for frame in frames[1:]]
                    for segment in range(3):
                        own = codes[segment * (FRAMES - 1) : (segment + 1) * (FRAMES - 1)]
                        assert own == sorted(own), codes
                        assert own[-1] - own[0] > 20, codes
                    start = np.asarray(gradient(), dtype=np.float64)  # (corrected a little)
                    assert np.abs(frames[0].astype(np.float64) - start).mean() < 8
                    for part in chain["parts"]:
                        fit = client.get(f"/v1/jobs/{part['id']}").json()["info"]
                        assert fit["colour_drift"]["after"] < fit["colour_drift"]["before"]
        finally:
            for pod in pods:
                pod.stop()


def test_console_builds_an_interactive_chain(
    service: ServiceProcess, client: httpx.Client, browser: Browser, tmp_path: Path
) -> None:
    """The web console in a real headless Chromium, on the real chain routes: start image
    uploaded from the form, a chain made segment by segment, finalized, the video shown."""
    gradient().save(tmp_path / "start.png")
    page = browser.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(service.url + "/")
    page.get_by_test_id("field-prompt").fill("a boat")
    page.get_by_test_id("field-start_image").set_input_files(tmp_path / "start.png")
    for name, value in (("width", SIZE), ("height", SIZE), ("num_frames", FRAMES), ("fps", 8)):
        page.get_by_test_id(f"field-{name}").fill(str(value))
    page.get_by_test_id("mode-chain").check()
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job][data-status=awaiting_input]")
    chain_id = page.get_by_test_id("job-id").inner_text()

    page.get_by_test_id("segment-prompt").fill("the boat sails away")
    page.get_by_test_id("add-segment").click()
    chain = client.get(f"/v1/jobs/{chain_id}").json()
    deadline = time.monotonic() + 60
    while not (chain["status"] == "awaiting_input" and len(chain["parts"]) == 2):
        assert time.monotonic() < deadline, chain
        time.sleep(0.2)
        chain = client.get(f"/v1/jobs/{chain_id}").json()
    page.get_by_test_id("finalize").click()
    page.wait_for_selector("[data-testid=job][data-status=succeeded]")
    page.locator("[data-testid=result] video").wait_for()
    assert errors == []

    chain = finished(client, chain_id)
    assert chain["status"] == "succeeded", chain
    assert chain["input"]["input"]["prompt"] == "a boat"
    second = client.get(f"/v1/jobs/{chain['parts'][1]['id']}").json()
    assert second["input"]["prompt"] == "the boat sails away"
    assert len(frames_of(client, video_url(chain))) == 2 * FRAMES - 1
    page.close()
