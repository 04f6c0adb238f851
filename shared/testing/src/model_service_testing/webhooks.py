"""A real webhook receiver on loopback for tests, verifying Standard Webhooks signatures."""

from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook

SECRET = "whsec_" + base64.b64encode(b"a-test-secret-of-32-bytes-length").decode()


class Receiver:
    """An HTTP server that records POSTs; `fail_first` answers 500 that many times;
    `answer_after_s` waits that long before answering (`release()` ends the waits);
    `arrived` counts the requests as they come in."""

    def __init__(self, port: int, fail_first: int = 0, answer_after_s: float = 0.0) -> None:
        self.port = port
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.arrived = 0
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.arrived += 1
                receiver.released.wait(answer_after_s)
                if receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    self.send_response(500)
                else:
                    receiver.received.append((dict(self.headers.items()), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def wait(self, count: int, timeout: float = 20) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"got {len(self.received)} of {count}"
            time.sleep(0.05)
        verifier = Webhook(SECRET)
        return [verifier.verify(body, headers) for headers, body in self.received]

    def wait_arrived(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.arrived < count:
            assert time.monotonic() < deadline, f"{self.arrived} of {count} requests came"
            time.sleep(0.05)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
