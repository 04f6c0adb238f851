"""The web console: served without a key, built from GET /v1/service's description of
the input; driven in a real headless Chromium against the echo service."""

import base64
import io
import json
import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from model_service.api.console import CONSOLE_DIR, CONSOLE_FILES, describe_input
from model_service.longvideo.spec import LongVideoSpec
from model_service.media_refs import AudioRef, ImageRef
from model_service.service import ServiceSpec
from model_service_testing.process import ServiceProcess

KEY = "console-key"


def test_console_is_public_and_the_service_describes_its_input(echo_service) -> None:
    service = echo_service(env={"API_KEYS": KEY})
    with httpx.Client(base_url=service.url) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert 'src="console/console.js"' in page.text
        for name, kind in [("console.js", "text/javascript"), ("console.css", "text/css")]:
            response = client.get(f"/console/{name}")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(kind)
            assert response.content == (CONSOLE_DIR / name).read_bytes()
        assert client.get("/console/index.html").status_code == 404, "only the listed files"
        assert client.get("/console/%2e%2e%2fapi%2fapp.py").status_code == 404
        for path in ("/v1/service", "/v1/jobs", "/docs"):
            assert client.get(path).status_code == 401, path
        info = client.get("/v1/service", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert (info["name"], info["title"], info["ready"]) == ("echo", "Echo (test fixture)", True)
    assert info["media"] == {"image": "image"}
    assert info["long_video"] is None
    schema = info["input_schema"]
    assert schema["title"] == "EchoInput"
    assert schema["properties"]["steps"] == {
        "default": 2,
        "maximum": 1000,
        "minimum": 1,
        "title": "Steps",
        "type": "integer",
    }
    assert "ok" in schema["properties"]["behaviour"]["enum"]


def test_every_console_file_is_served_and_in_the_package() -> None:
    names = {path.name for path in CONSOLE_DIR.iterdir()}
    assert names == {"index.html", *CONSOLE_FILES}
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    for name in names:
        assert any(fnmatch(f"console/{name}", glob) for glob in globs["model_service"]), name


class Lora(BaseModel):
    source: str = Field(..., description="Where the LoRA is.")
    strength: float = 1.0


class VideoInput(BaseModel):
    prompt: str
    start_image: ImageRef | None = None
    end_image: ImageRef | None = None
    voice: AudioRef | None = None
    references: list[ImageRef] = Field(default_factory=list)
    num_frames: int = 81
    loras: list[Lora] = Field(default_factory=list)
    mode: Literal["a", "b"] = "a"


VIDEO_SPEC = ServiceSpec(
    name="video",
    title="Video",
    version="1",
    description="",
    default_port=1,
    input_model=VideoInput,
    predictor="x:Y",
    min_vram_gb=0,
    long_video=LongVideoSpec(image_field="start_image", end_image_field="end_image"),
)


def test_the_description_names_file_fields_lists_and_long_videos() -> None:
    described = describe_input(VIDEO_SPEC)
    assert described.media == {
        "start_image": "image",
        "end_image": "image",
        "voice": "audio",
        "references": "image",
    }
    assert described.long_video is not None
    assert described.long_video.model_dump() == {
        "chains": True,
        "travels": True,
        "joins": True,
        "image_field": "start_image",
        "end_image_field": "end_image",
        "frames_field": "num_frames",
        "segment_fields": ["prompt", "num_frames", "loras"],  # those the input has
    }
    loras = described.input_schema["properties"]["loras"]
    assert loras["items"] == {"$ref": "#/$defs/Lora"}
    assert described.input_schema["$defs"]["Lora"]["required"] == ["source"]
    echo_like = ServiceSpec(**{**VIDEO_SPEC.__dict__, "long_video": None})
    assert describe_input(echo_like).long_video is None


# --- in a real browser ------------------------------------------------------------------

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


@pytest.fixture
def page(browser: "Browser") -> Iterator["Page"]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], "uncaught errors in the page's script"


def enter_key(page: "Page", service: ServiceProcess) -> None:
    page.goto(service.url + "/")
    page.get_by_test_id("api-key").fill(KEY)
    page.get_by_test_id("key-save").click()
    page.wait_for_selector("[data-testid=field-text]")


def test_key_form_failed_job_cancel_and_retry_in_the_browser(echo_service, page) -> None:
    service = echo_service(env={"API_KEYS": KEY})
    page.goto(service.url + "/")
    assert page.get_by_test_id("key-box").is_visible(), "the service answered 401"
    page.get_by_test_id("api-key").fill("wrong")
    page.get_by_test_id("key-save").click()
    page.wait_for_selector("#key-note:has-text('refused')")
    enter_key(page, service)
    assert page.title() == "Echo (test fixture) · console"
    assert not page.get_by_test_id("key-box").is_visible()
    # the form follows the schema: enum -> select, integer -> number with its bounds
    steps = page.get_by_test_id("field-steps")
    assert (steps.get_attribute("type"), steps.get_attribute("min")) == ("number", "1")
    assert steps.input_value() == "2"
    assert page.get_by_test_id("field-behaviour").evaluate("e => e.tagName") == "SELECT"
    assert page.get_by_test_id("field-image").get_attribute("accept") == "image/*"
    assert not page.locator("#mode").is_visible(), "no long videos"

    # a job that fails: its error code and message
    page.get_by_test_id("field-behaviour").select_option(label="error")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job][data-status=failed]")
    error = page.get_by_test_id("job-error")
    assert error.get_by_test_id("error-code").inner_text() == "model_error"
    assert error.get_by_test_id("error-message").inner_text()
    failed_id = page.get_by_test_id("job-id").inner_text()
    page.wait_for_selector(f"tr[data-job-id='{failed_id}'][data-status=failed]")

    # a long job, canceled while it runs, then retried from the history
    page.get_by_test_id("field-behaviour").select_option(label="ok")
    page.get_by_test_id("field-steps").fill("200")
    page.get_by_test_id("field-step_s").fill("0.05")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job][data-status=running]")
    page.wait_for_function(
        "document.querySelector('#job-progress').value > 0"
    )  # live progress over the event stream
    assert page.get_by_test_id("job").get_attribute("data-watch") == "events"
    page.get_by_test_id("job").get_by_test_id("cancel").click()
    page.wait_for_selector("[data-testid=job][data-status=canceled]")
    job_id = page.get_by_test_id("job-id").inner_text()
    page.wait_for_selector(f"tr[data-job-id='{job_id}'][data-status=canceled]")
    page.locator(f"tr[data-job-id='{job_id}']").get_by_test_id("retry").click()
    page.wait_for_selector(f"[data-testid=job][data-status=running] >> text={job_id}")
    page.get_by_test_id("job").get_by_test_id("cancel").click()
    page.wait_for_selector("[data-testid=job][data-status=canceled]")

    # clicking a row shows that job
    page.locator(f"tr[data-job-id='{failed_id}']").click()
    page.wait_for_selector(f"[data-testid=job-id]:text-is('{failed_id}')")
    assert page.get_by_test_id("job").get_attribute("data-status") == "failed"


def test_polling_when_the_event_stream_fails(echo_service, page) -> None:
    service = echo_service()  # no API_KEYS: no key box
    page.route(re.compile(r".*/events$"), lambda route: route.abort())
    page.goto(service.url + "/")
    page.wait_for_selector("[data-testid=field-text]")
    assert not page.get_by_test_id("key-box").is_visible()
    page.get_by_test_id("field-steps").fill("10")
    page.get_by_test_id("field-step_s").fill("0.2")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job][data-watch=polling]")
    page.wait_for_selector("[data-testid=job][data-status=succeeded]", timeout=30_000)
    assert page.get_by_test_id("job-progress-text").inner_text().startswith("step 10 / 10")
    image = page.get_by_test_id("result").locator("img")
    image.wait_for()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
    )


def _png(size: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def test_a_jobs_input_is_shown_named_in_the_history_and_reused(echo_service, page) -> None:
    """Issue 26: the input beside the result, the history by prompt not bare id, and "use
    settings" filling the form again (a data URI, shown shortened, must be chosen again;
    an upload id is reused)."""
    service = echo_service()
    with httpx.Client(base_url=service.url) as client:
        upload = client.post("/v1/uploads", files={"file": ("a.png", _png(8))}).json()
        data_uri = "data:image/png;base64," + base64.b64encode(_png(64)).decode()
        by_upload = client.post(
            "/v1/jobs", json={"input": {"text": "a red fox", "steps": 3, "image": upload["id"]}}
        ).json()
        by_data = client.post(
            "/v1/jobs",
            json={"input": {"text": "x" * 150, "image": data_uri, "behaviour": "error"}},
        ).json()
    page.goto(service.url + "/")
    fox = page.locator(f"tr[data-job-id='{by_upload['id']}']")
    assert fox.get_by_test_id("job-label").inner_text() == "a red fox"
    long_label = page.locator(f"tr[data-job-id='{by_data['id']}']").get_by_test_id("job-label")
    assert long_label.inner_text() == "x" * 80

    fox.click()
    page.wait_for_selector(f"[data-testid=job-id]:text-is('{by_upload['id']}')")
    shown = page.get_by_test_id("job-input")
    assert shown.locator("dd[data-field=text]").inner_text() == "a red fox"
    assert shown.locator("dd[data-field=steps]").inner_text() == "3"
    assert shown.locator("dd[data-field=image]").inner_text() == upload["id"]
    page.get_by_test_id("field-text").fill("something else")
    page.get_by_test_id("field-steps").fill("9")
    page.get_by_test_id("job").get_by_test_id("reuse").click()
    assert page.get_by_test_id("field-text").input_value() == "a red fox"
    assert page.get_by_test_id("field-steps").input_value() == "3"
    assert page.locator("#f-image-ref").input_value() == upload["id"]
    assert page.get_by_test_id("submit-state").inner_text() == f"the settings of {by_upload['id']}"
    page.get_by_test_id("submit").click()  # the same settings run again
    page.wait_for_selector(
        f"[data-testid=job][data-status=succeeded]:not(:has-text('{by_upload['id']}'))"
    )
    again = page.get_by_test_id("job-input")
    assert again.locator("dd[data-field=image]").inner_text() == upload["id"]
    assert again.locator("dd[data-field=steps]").inner_text() == "3"

    page.locator(f"tr[data-job-id='{by_data['id']}']").click()
    page.wait_for_selector(f"[data-testid=job-id]:text-is('{by_data['id']}')")
    assert "chars)" in page.get_by_test_id("job-input").locator("dd[data-field=image]").inner_text()
    page.get_by_test_id("job").get_by_test_id("reuse").click()
    assert page.locator("#f-image-ref").input_value() == ""
    assert page.get_by_test_id("field-behaviour").input_value() == '"error"'
    assert page.get_by_test_id("field-steps").input_value() == "2", "unset: the default"
    assert (
        page.get_by_test_id("submit-state")
        .inner_text()
        .endswith("choose again (sent as data): image")
    )


def test_long_video_chain_controls(echo_service, page) -> None:
    """The chain UI against the echo service with the long-video routes mocked in the page
    (the echo service has none; the real routes are tested with the video services)."""
    service = echo_service()
    seen: list[tuple[str, Any]] = []
    chain: dict[str, Any] = {"status": "awaiting_input", "parts": 1}

    def job() -> dict[str, Any]:
        part = {"status": "succeeded", "progress": 1.0, "seed": 1, "video": None, "error": None}
        parts = [{**part, "id": f"p{i}", "index": i} for i in range(chain["parts"])]
        if chain["parts"] == 2 and chain["status"] == "awaiting_input":
            parts[1] = {**parts[1], "status": "running", "progress": 0.4}
        return {**chain["record"], "kind": "chain", "status": chain["status"], "parts": parts}

    def service_info(route) -> None:
        info = route.fetch().json()
        info["long_video"] = {
            "chains": True,
            "travels": True,
            "image_field": "image",
            "end_image_field": None,
            "frames_field": "steps",
            "segment_fields": ["prompt"],
        }
        route.fulfill(json=info)

    def create_chain(route) -> None:
        body = json.loads(route.request.post_data or "{}")
        seen.append(("create", body))
        # a real job record as the template (its id, timings, links)
        record = httpx.post(service.url + "/v1/jobs", json={"input": {}}).json()
        chain["record"] = {**record, "input": body}  # a chain shows its request
        route.fulfill(status=202, json=job())

    def events(route) -> None:  # one event, then the stream ends: the page polls
        route.fulfill(
            status=200,
            headers={"content-type": "text/event-stream"},
            body=f": ping\n\nevent: status\ndata: {json.dumps(job())}\n\n",
        )

    def get_job(route) -> None:
        if route.request.url.endswith("/" + chain["record"]["id"]):
            route.fulfill(json=job())
        else:
            route.fallback()

    def segments(route) -> None:
        seen.append(("segments", json.loads(route.request.post_data or "{}")))
        chain["parts"] = 2
        route.fulfill(json=job())

    def delete_last(route) -> None:
        assert route.request.method == "DELETE"
        seen.append(("delete", None))
        chain["parts"] = 1
        route.fulfill(json=job())

    def finalize(route) -> None:
        seen.append(("finalize", None))
        chain["status"] = "succeeded"
        route.fulfill(json=job())

    page.route("**/v1/service", service_info)
    page.route("**/v1/chains", create_chain)
    page.route(re.compile(r".*/v1/jobs/[^/?]+$"), get_job)
    page.route(re.compile(r".*/v1/jobs/[^/]+/events$"), events)
    page.route("**/v1/chains/*/segments", segments)
    page.route("**/v1/chains/*/finalize", finalize)
    page.route("**/v1/chains/*/segments/last", delete_last)
    page.goto(service.url + "/")
    page.wait_for_selector("[data-testid=field-text]")
    assert not page.get_by_test_id("mode-join").is_visible(), "no joins on this service"
    page.get_by_test_id("mode-chain").check()
    page.get_by_test_id("field-text").fill("a cat")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=chain-controls]:visible")
    assert seen[0] == (
        "create",
        {
            "input": {"text": "a cat", "steps": 2, "step_s": 0, "behaviour": "ok"},
            "segments": [{}],
            "interactive": True,
        },
    )
    page.get_by_test_id("segment-prompt").fill("the cat jumps")
    page.get_by_test_id("add-segment").click()
    page.wait_for_selector("[data-testid=job-parts] li >> nth=1")
    assert seen[1] == ("segments", {"segments": [{"prompt": "the cat jumps"}]})
    assert page.get_by_test_id("segment-prompt").input_value() == ""
    # progress counts segments: the second one runs at 40 %, not "step 200 / 200"
    assert page.get_by_test_id("job-progress-text").inner_text().startswith("segment 2 / 2 (40%)")
    page.get_by_test_id("delete-segment").click()  # to redo it
    page.wait_for_selector("[data-testid=job-parts] li >> nth=1", state="detached")
    assert seen[2] == ("delete", None)
    assert page.get_by_test_id("job-progress-text").inner_text().startswith("1 segment done")
    page.get_by_test_id("finalize").click()
    page.wait_for_selector("[data-testid=job][data-status=succeeded]")
    assert seen[3] == ("finalize", None)
    assert not page.get_by_test_id("chain-controls").is_visible()
    page.get_by_test_id("job").get_by_test_id("reuse").click()  # a chain's settings: its mode
    assert page.get_by_test_id("mode-chain").is_checked()
    assert page.get_by_test_id("field-text").input_value() == "a cat"


def test_travel_mode_sends_the_images_and_a_prompt_per_leg(echo_service, page) -> None:
    service = echo_service()
    sent: list[dict[str, Any]] = []

    def service_info(route) -> None:
        info = route.fetch().json()
        info["long_video"] = {
            "chains": True,
            "travels": True,
            "image_field": "image",
            "end_image_field": "image",
            "frames_field": "steps",
            "segment_fields": ["text"],
        }
        route.fulfill(json=info)

    def create_travel(route) -> None:
        body = json.loads(route.request.post_data or "{}")
        sent.append(body)
        record = httpx.post(service.url + "/v1/jobs", json={"input": {}}).json()
        travel = {**record, "id": "travel-1", "kind": "travel", "input": body, "parts": []}
        route.fulfill(status=202, json=travel)  # an id the service lacks: its events 404

    page.route("**/v1/service", service_info)
    page.route("**/v1/travels", create_travel)
    page.goto(service.url + "/")
    page.wait_for_selector("[data-testid=field-text]")
    assert not page.locator("#travel-box").is_visible()
    page.get_by_test_id("mode-travel").check()
    assert page.locator("#travel-box").is_visible()
    assert "first and last frame" in page.get_by_test_id("mode-hint").inner_text()
    page.locator("#travel-images-ref").fill("upl_a upl_b  https://example.com/c.png")
    page.get_by_test_id("travel-prompts").fill("a boat\n\n  it docks  \n")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job]:visible")
    assert sent == [
        {
            "input": {"text": "hello", "steps": 2, "step_s": 0, "behaviour": "ok"},
            "images": ["upl_a", "upl_b", "https://example.com/c.png"],
            "prompts": ["a boat", "it docks"],
        }
    ]
    page.get_by_test_id("travel-prompts").fill("")
    page.get_by_test_id("mode-job").check()
    page.get_by_test_id("job").get_by_test_id("reuse").click()
    assert page.get_by_test_id("mode-travel").is_checked()
    assert page.locator("#travel-images-ref").input_value().split() == [
        "upl_a",
        "upl_b",
        "https://example.com/c.png",
    ]
    assert page.get_by_test_id("travel-prompts").input_value() == "a boat\nit docks"


def test_join_and_redo_modes_send_their_requests(echo_service, page) -> None:
    """Issue 27: the console's join and redo forms (routes mocked: the echo service has
    none); shown only where the service offers them."""
    service = echo_service()
    sent: list[tuple[str, dict[str, Any]]] = []

    def service_info(route) -> None:
        info = route.fetch().json()
        info["long_video"] = {
            "chains": True,
            "travels": True,
            "joins": True,
            "image_field": "image",
            "end_image_field": "image",
            "frames_field": "steps",
            "segment_fields": ["text"],
        }
        route.fulfill(json=info)

    def create(route) -> None:
        kind = route.request.url.rsplit("/", 1)[-1].removesuffix("s")
        body = json.loads(route.request.post_data or "{}")
        sent.append((kind, body))
        record = httpx.post(service.url + "/v1/jobs", json={"input": {}}).json()
        job = {**record, "id": f"{kind}-1", "kind": kind, "input": body, "parts": []}
        route.fulfill(status=202, json=job)

    page.route("**/v1/service", service_info)
    page.route(re.compile(r".*/v1/(joins|redos)$"), create)
    page.goto(service.url + "/")
    page.wait_for_selector("[data-testid=field-text]")
    page.get_by_test_id("mode-join").check()
    assert page.locator("#join-box").is_visible()
    assert not page.locator("#redo-box").is_visible()
    page.locator("#join-clips-ref").fill("upl_a https://example.com/b.mp4")
    page.get_by_test_id("join-bridge-frames").fill("7")
    page.get_by_test_id("join-prompts").fill("a pan")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job-id]:text-is('join-1')")
    page.get_by_test_id("mode-redo").check()
    assert page.locator("#redo-box").is_visible()
    page.locator("#redo-video-ref").fill("upl_v")
    page.get_by_test_id("redo-start").fill("30")
    page.get_by_test_id("redo-end").fill("44")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job-id]:text-is('redo-1')")
    form = {"text": "hello", "steps": 2, "step_s": 0, "behaviour": "ok"}
    assert sent == [
        (
            "join",
            {
                "input": form,
                "clips": ["upl_a", "https://example.com/b.mp4"],
                "bridge_frames": 7,
                "prompt": "a pan",
            },
        ),
        ("redo", {"input": form, "video": "upl_v", "start_frame": 30, "end_frame": 44}),
    ]
    page.get_by_test_id("redo-start").fill("")
    page.get_by_test_id("mode-job").check()
    page.get_by_test_id("job").get_by_test_id("reuse").click()
    assert page.get_by_test_id("mode-redo").is_checked()
    assert page.get_by_test_id("redo-start").input_value() == "30"
    assert page.locator("#redo-video-ref").input_value() == "upl_v"
