"""Small requests that cost much: an image that decodes to far more than it weighs is
held to a memory budget (per request, and for the process); large bodies and data URIs
are parsed off the event loop."""

import asyncio
import io
import json
import threading

from PIL import Image

from model_service.api.body import OffLoopJsonRequest
from model_service.decode_budget import DecodeBudget, RequestImages
from model_service.errors import DecodedTooLarge
from model_service.offloop import OFF_LOOP_BYTES, off_loop
from model_service_testing.media import data_uri


def test_an_image_that_decodes_over_the_budget_is_refused(echo_service) -> None:
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")  # ~40 KB; 108 MB as RGB
    assert len(buffer.getvalue()) < 200_000
    service = echo_service(env={"MAX_DECODED_MB": "64"})
    with service.client() as client:
        body = {"input": {"image": data_uri(buffer.getvalue())}}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "decoded_too_large"
        assert error["field"] == "input.image"
        assert "MAX_DECODED_MB=64" in error["message"]
        assert client.get("/v1/jobs").json()["jobs"] == []


def test_one_requests_images_count_together() -> None:
    async def run() -> str:
        budget = DecodeBudget(200)
        request = RequestImages()
        for index in range(2):  # 75 bytes each
            async with budget.hold((5, 5), 3, f"images[{index}]", request):
                pass
        assert request.decoded_bytes == 150
        async with budget.hold((5, 5), 3, "image", RequestImages()):
            pass  # another request has its own count
        try:
            async with budget.hold((5, 5), 3, "images[2]", request):
                pass
        except DecodedTooLarge as exc:
            return exc.message
        raise AssertionError("the third image was not refused")

    message = asyncio.run(run())
    assert message.startswith("images[2]: the request's images")


def test_images_of_other_requests_wait_for_room() -> None:
    async def run() -> list[str]:
        budget = DecodeBudget(100)
        order: list[str] = []
        first_in = asyncio.Event()
        release = asyncio.Event()

        async def first() -> None:
            async with budget.hold((6, 10), 1, "a", None):
                order.append("first decodes")
                first_in.set()
                await release.wait()
                order.append("first done")

        async def second() -> None:
            await first_in.wait()
            async with budget.hold((6, 10), 1, "b", None):
                order.append("second decodes")

        tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
        await first_in.wait()
        for _ in range(20):  # the second has every chance to go ahead: it must not
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == ["first decodes", "first done", "second decodes"]


def test_large_data_is_parsed_in_a_thread(monkeypatch) -> None:
    main = threading.get_ident()

    async def where(size: int) -> int:
        return await off_loop(size, threading.get_ident)

    assert asyncio.run(where(10)) == main
    assert asyncio.run(where(OFF_LOOP_BYTES)) != main

    body = json.dumps({"input": {"text": "x" * OFF_LOOP_BYTES}}).encode()
    parsed_in: list[int] = []
    loads = json.loads

    def spy(data: bytes) -> object:
        parsed_in.append(threading.get_ident())
        return loads(data)

    async def parse() -> object:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        return await OffLoopJsonRequest({"type": "http", "headers": []}, receive).json()

    monkeypatch.setattr(json, "loads", spy)
    assert asyncio.run(parse()) == loads(body)
    assert parsed_in
    assert main not in parsed_in
