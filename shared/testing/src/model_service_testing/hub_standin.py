"""A file server on loopback that also answers like the Hugging Face Hub
(`/<org>/<repo>/resolve/<rev>/<path>` with `X-Repo-Commit` and `ETag`), with faults:
cuts, ignored ranges, wrong bytes, error statuses, redirects, slow chunks. For the
weights tests (provisioning, the LoRA cache)."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

SIZE = 1_000_000
COMMIT = "a" * 40


def blob(seed: int, size: int = SIZE) -> bytes:
    """A valid safetensors file of exactly `size` bytes: one U8 tensor of random bytes."""

    def header(n: int) -> bytes:
        tensor = {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}
        return json.dumps({"__metadata__": {"seed": str(seed)}, "data": tensor}).encode()

    room = len(header(size))  # n < size: its header is no longer; padded with spaces
    n = size - 8 - room
    body = random.Random(seed).randbytes(n)  # noqa: S311 - test data
    return room.to_bytes(8, "little") + header(n).ljust(room) + body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the server --------------------------------------------------------------------


@dataclass
class Knobs:
    """Server state and faults. Paths are URL paths (`/f/a.safetensors`)."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    gets: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    heads: list[str] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    served: int = 0  # body bytes written
    cut_after: dict[str, int] = field(default_factory=dict)  # close after N bytes, once
    ignore_range: set[str] = field(default_factory=set)
    wrong_bytes: set[str] = field(default_factory=set)  # same size, other contents
    status: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    redirect: dict[str, str] = field(default_factory=dict)  # path -> Location (302)
    chunk_delay_s: float = 0.0  # per 64 KiB: slow downloads
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    knobs: Knobs

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _target(self) -> tuple[str, bool]:
        """(blob key, is a Hub resolve URL). Hub: /<org>/<repo>/resolve/<rev>/<path>."""
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) > 4 and parts[2] == "resolve":
            return "/hub/" + "/".join([parts[0], parts[1], *parts[4:]]), True
        return self.path.split("?")[0], False

    def _error(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _hub_headers(self, data: bytes) -> None:
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sha(data)}"')

    def do_HEAD(self) -> None:
        key, is_hub = self._target()
        k = self.knobs
        with k.lock:
            k.heads.append(key)
        if key in k.status:
            self._error(*k.status[key])
            return
        if key not in k.blobs:
            self._error(404, {"X-Error-Code": "EntryNotFound"} if is_hub else {})
            return
        data = k.blobs[key]
        self.send_response(200)
        if is_hub:
            self._hub_headers(data)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        key, is_hub = self._target()
        k = self.knobs
        range_header = self.headers.get("Range")
        with k.lock:
            k.gets.append((key, range_header))
            k.auth.append(self.headers.get("Authorization"))
        if key in k.redirect:
            self._error(302, {"Location": k.redirect[key]})
            return
        if key in k.status:
            self._error(*k.status[key])
            return
        if key not in k.blobs:
            self._error(404)
            return
        data = k.blobs[key]
        if key in k.wrong_bytes:
            data = random.Random(99).randbytes(len(data))  # noqa: S311 - test data
        start = 0
        if range_header and key not in k.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if is_hub:
            self._hub_headers(k.blobs[key])
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        with k.lock:
            cut = k.cut_after.pop(key, None)
        body = data[start:] if cut is None else data[start : start + cut]
        for i in range(0, len(body), 65536):
            chunk = body[i : i + 65536]
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:
                return
            with k.lock:
                k.served += len(chunk)
            if k.chunk_delay_s:
                time.sleep(k.chunk_delay_s)
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class Server(NamedTuple):
    url: str
    knobs: Knobs

    def add(self, path: str, data: bytes) -> str:
        self.knobs.blobs[path] = data
        return self.url + path

    def gets_of(self, path: str) -> list[str | None]:
        return [r for p, r in self.knobs.gets if p == path]

    def auth_of(self, path: str) -> list[str | None]:
        """The Authorization header of each GET of `path`."""
        return [a for (p, _), a in zip(self.knobs.gets, self.knobs.auth, strict=True) if p == path]


@contextmanager
def serve() -> Iterator[Server]:
    knobs = Knobs()
    handler = type("Handler", (_Handler,), {"knobs": knobs})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", knobs)
    finally:
        httpd.shutdown()
        httpd.server_close()
