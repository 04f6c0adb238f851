"""The web console in a real headless Chromium against the real tiny Qwen service
(PROFILE=tiny: random weights on CPU, real edits), with API_KEYS set."""

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from PIL import Image

from model_service_testing.process import ServiceProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

KEY = "qwen-console-key"
# records each state of the job panel (status, progress text): a job on the tiny model
# can finish between two polls of the test
RECORD_STATES = """() => {
  window.seenStates = [];
  const job = document.getElementById("job");
  const text = document.getElementById("job-progress-text");
  new MutationObserver(() => window.seenStates.push([job.dataset.status, text.textContent]))
    .observe(job, { subtree: true, childList: true, characterData: true, attributes: true });
}"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("qwen-console")
    process = ServiceProcess(
        "model_service.cli",
        root / "data",
        env={
            "PROFILE": "tiny",
            "MODELS_DIR": str(root / "models"),
            "JOB_TIMEOUT_S": "120",
            "API_KEYS": KEY,
        },
        args=["serve", "qwen-image-edit-nunchaku"],
    )
    process.headers = {"Authorization": f"Bearer {KEY}"}
    process.start(timeout=300)
    yield process
    process.stop()


def test_console_is_public_and_names_the_image_fields(service: ServiceProcess) -> None:
    with httpx.Client(base_url=service.url) as anonymous:
        assert anonymous.get("/").status_code == 200
        assert anonymous.get("/console/console.js").status_code == 200
        assert anonymous.get("/v1/service").status_code == 401
    with service.client() as client:
        info = client.get("/v1/service").json()
    assert info["media"] == {
        "image": "image",
        "images": "image",
        "mask": "image",
        "references": "image",
    }
    assert info["long_video"] is None
    width = info["input_schema"]["properties"]["width"]["anyOf"][0]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 2048, 16)
    assert info["input_schema"]["required"] == ["prompt"]
    assert info["model"]["transformer_kind"] == "float32-cpu", "the existing facts stay"


@pytest.fixture
def page(browser: "Browser", service: ServiceProcess) -> Iterator["Page"]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(service.url + "/")
    page.get_by_test_id("key-box").wait_for()  # the service answered 401
    page.get_by_test_id("api-key").fill(KEY)
    page.get_by_test_id("key-save").click()
    page.get_by_test_id("field-prompt").wait_for()
    yield page
    context.close()
    assert errors == [], "uncaught errors in the page's script"


def png_file(path: Path, size: tuple[int, int] = (80, 64)) -> Path:
    image = Image.new("RGB", size)
    image.putdata([(x * 3 % 256, y * 4 % 256, 128) for y in range(size[1]) for x in range(size[0])])
    image.save(path, format="PNG")
    return path


def test_an_edit_from_the_form_to_the_image(page: "Page", tmp_path: Path) -> None:
    assert page.title() == "Qwen-Image-Edit · console"
    # the form follows the schema
    width = page.get_by_test_id("field-width")
    assert (width.get_attribute("min"), width.get_attribute("step")) == ("64", "16")
    assert page.get_by_test_id("field-prompt").evaluate("e => e.tagName") == "TEXTAREA"
    assert page.get_by_test_id("field-images").get_attribute("multiple") == ""
    fmt = page.get_by_test_id("field-output_format")
    assert fmt.evaluate("e => [...e.options].map(o => o.textContent)") == ["png", "jpeg", "webp"]

    page.get_by_test_id("field-prompt").fill("make it blue")
    page.get_by_test_id("field-image").set_input_files(png_file(tmp_path / "in.png"))
    preview = page.get_by_test_id("preview-image").locator("img")
    page.wait_for_function("img => img.naturalWidth === 80", arg=preview.element_handle())
    page.get_by_test_id("field-width").fill("80")
    page.get_by_test_id("field-height").fill("64")
    page.get_by_test_id("field-steps").fill("6")
    page.get_by_test_id("field-seed").fill("7")
    page.evaluate(RECORD_STATES)
    page.get_by_test_id("submit").click()

    settled = "[data-testid=job][data-status=succeeded], [data-testid=job][data-status=failed]"
    page.wait_for_selector(f"{settled}, [data-testid=submit-error]:visible", timeout=60_000)
    assert page.get_by_test_id("job").get_attribute("data-status") == "succeeded", (
        page.get_by_test_id("submit-error").inner_text() or page.get_by_test_id("job").inner_text()
    )
    seen = page.evaluate("window.seenStates")
    steps_seen = [text for status, text in seen if status == "running" and "step " in text]
    assert any(not text.startswith("step 0 ") for text in steps_seen), seen
    assert page.get_by_test_id("job").get_attribute("data-watch") == "events"
    assert page.get_by_test_id("job-progress-text").inner_text() == "step 6 / 6 · 100%"
    result = page.get_by_test_id("result").locator("img")
    result.wait_for()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth === 80 && img.naturalHeight === 64",
        arg=result.element_handle(),
    )
    assert result.get_attribute("src").startswith("blob:"), "fetched with the key"
    job_id = page.get_by_test_id("job-id").inner_text()
    row = page.locator(f"tr[data-job-id='{job_id}']")
    page.wait_for_selector(f"tr[data-job-id='{job_id}'][data-status=succeeded]")
    assert row.locator("td").nth(3).inner_text() == "100%"
    # the job's input names the uploaded file by its id
    with httpx.Client(base_url=page.url.rstrip("/")) as client:
        job = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert job["input"]["images"][0].startswith("upl_")
    assert job["input"]["seed"] == 7
    # the image in the page is the job's output
    shown = page.evaluate(
        "async img => [...new Uint8Array(await (await fetch(img.src)).arrayBuffer())]",
        result.element_handle(),
    )
    output = httpx.get(job["outputs"][0]["url"], headers={"Authorization": f"Bearer {KEY}"})
    assert bytes(shown) == output.content
    assert Image.open(io.BytesIO(output.content)).size == (80, 64)


def test_several_images_are_uploaded_for_a_list_field(page: "Page", tmp_path: Path) -> None:
    files = [png_file(tmp_path / f"{i}.png", (64 + 16 * i, 64)) for i in range(2)]
    page.get_by_test_id("field-prompt").fill("merge them")
    page.get_by_test_id("field-images").set_input_files(files)
    assert page.get_by_test_id("preview-images").locator("img").count() == 2
    page.get_by_test_id("field-width").fill("64")
    page.get_by_test_id("field-height").fill("64")
    page.get_by_test_id("field-steps").fill("2")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=job][data-status=succeeded]", timeout=60_000)
    body = sent.value.post_data_json
    assert [ref[:4] for ref in body["input"]["images"]] == ["upl_", "upl_"]
    assert "image" not in body["input"], "the empty single-image field is left out"
    assert "seed" not in body["input"], "empty optional fields are left out"
    assert body["input"]["width"] == 64


def test_invalid_input_shows_the_api_error(page: "Page", tmp_path: Path) -> None:
    page.get_by_test_id("field-prompt").fill("x")
    page.get_by_test_id("field-image").set_input_files(png_file(tmp_path / "in.png"))
    page.get_by_test_id("field-width").fill("65")
    page.get_by_test_id("field-height").fill("64")
    page.get_by_test_id("submit").click()
    error = page.get_by_test_id("submit-error")
    error.wait_for()
    assert error.get_by_test_id("error-code").inner_text() == "invalid_input"
    message = error.get_by_test_id("error-message").inner_text()
    assert "input.width" in message
    assert "multiple of 16" in message
    assert error.get_by_test_id("error-field").inner_text() == "field: input.width"
    assert page.locator(".field[data-field=width]").get_attribute("class") == "field bad"
    assert page.get_by_test_id("job").is_hidden(), "no job was made"
    # a missing prompt, too: the API's message, not the browser's
    page.get_by_test_id("field-prompt").fill("")
    page.get_by_test_id("field-width").fill("64")
    page.get_by_test_id("submit").click()
    page.wait_for_selector("[data-testid=submit-error] >> text=input.prompt")
    assert page.locator(".field[data-field=width]").get_attribute("class") == "field"
