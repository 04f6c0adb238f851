"""Two PUTs of one job id at once (a client retrying a slow PUT): the request that loses
touches nothing of the winner's. Each request writes its input files under a name of its
own; only the one whose job is stored moves them into the job's folder."""

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from model_service_testing.media import data_uri, png_bytes
from model_service_testing.process import wait_started, wait_status

LOSER_COLOUR = (10, 20, 30)
WINNER_COLOUR = (200, 100, 50)


class SlowImage:
    """An image server whose answer waits until the test lets it go: the losing PUT
    stays inside its fetch while the other PUT wins the id."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()
        image = png_bytes(color=LOSER_COLOUR)
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                gate.asked.set()
                gate.release.wait(60)
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.asked.clear()
        self.release.clear()


@pytest.fixture
def slow_image() -> Iterator[SlowImage]:
    server = SlowImage()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()


def pixel(client: httpx.Client, job: dict) -> tuple[int, int, int]:
    url = next(out["url"] for out in job["outputs"] if out["name"] == "out.png")
    return Image.open(io.BytesIO(client.get(url).content)).getpixel((0, 0))


def test_the_losing_put_leaves_the_winners_input_files_alone(echo_service, slow_image) -> None:
    service = echo_service(env={"FETCH_ALLOW_NETWORKS": "127.0.0.1/32", "JOBS_AHEAD": "0"})
    winner_image = data_uri(png_bytes(color=WINNER_COLOUR))
    with service.client() as client:
        for attempt in range(3):
            slow_image.reset()
            blocker = client.post("/v1/jobs", json={"input": {"steps": 600, "step_s": 0.1}})
            wait_started(client, blocker.json()["id"])  # the raced job waits, queued
            job_id = f"raced-{attempt}"
            answers: dict[str, httpx.Response] = {}

            def put_loser(job_id: str = job_id, answers: dict = answers) -> None:
                with service.client() as other:
                    body = {"input": {"image": slow_image.url, "text": "loser"}}
                    answers["loser"] = other.put(f"/v1/jobs/{job_id}", json=body)

            loser = threading.Thread(target=put_loser)
            loser.start()
            assert slow_image.asked.wait(60), "the losing PUT never fetched its image"
            won = client.put(f"/v1/jobs/{job_id}", json={"input": {"image": winner_image}})
            assert won.status_code == 202, won.text
            slow_image.release.set()  # the loser writes its file only now, then loses
            loser.join(60)
            assert answers["loser"].status_code == 409, answers["loser"].text
            assert answers["loser"].json()["error"]["code"] == "idempotency_conflict"
            client.post(f"/v1/jobs/{blocker.json()['id']}/cancel")
            done = wait_status(client, job_id, {"succeeded", "failed"})
            assert done["status"] == "succeeded", done.get("error")
            inverted = tuple(255 - value for value in WINNER_COLOUR)
            assert pixel(client, done) == inverted  # the winner's image, not the loser's
    assert not list((service.data_dir / "staging").glob("*"))  # the loser's removed too
