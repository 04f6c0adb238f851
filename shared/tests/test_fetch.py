"""SafeHttpClient against real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from model_service.errors import FetchFailed, UrlNotAllowed
from model_service.fetch import SafeHttpClient, _AddressRefused, _PinningBackend, address_allowed

LOOPBACK = [ipaddress.ip_network("127.0.0.1/32")]
LIMIT = 1000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    posts: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        try:
            if url.path == "/ok":
                self._send(200, b"hello bytes", Content_Type="image/png")
            elif url.path == "/host":
                self._send(200, self.headers["Host"].encode())
            elif url.path == "/redirect":
                self._send(302, Location=query["to"][0])
            elif parts[0] == "hops":
                left = int(parts[1])
                if left:
                    self._send(302, Location=f"/hops/{left - 1}")
                else:
                    self._send(200, b"done")
            elif url.path == "/big":
                self.send_response(200)
                self.send_header("Content-Length", str(LIMIT * 5))
                self.end_headers()
                self.wfile.write(b"x" * LIMIT * 5)
            elif url.path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"%x\r\n%s\r\n" % (500, b"y" * 500))
                self.wfile.write(b"0\r\n\r\n")
            elif url.path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):  # one byte every 50 ms: each read is quick, the total is not
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        _Handler.posts.append((self.path, dict(self.headers), body))
        if self.path == "/redirect":
            self._send(302, Location="/hook")
        else:
            self._send(200, b"thanks")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def client() -> AsyncIterator[SafeHttpClient]:
    c = SafeHttpClient(allow_networks=LOOPBACK, max_bytes=LIMIT, timeout_s=2.0, max_redirects=3)
    yield c
    await c.aclose()


@pytest.fixture
async def public_only() -> AsyncIterator[SafeHttpClient]:
    c = SafeHttpClient(max_bytes=LIMIT, timeout_s=2.0)
    yield c
    await c.aclose()


def _fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> list[str]:
    """Answers lookups of the names in `table`; others go to the real resolver."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked: list[str] = []

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in table:
            return await real(host, port, *args, **kwargs)
        asked.append(host)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in table[host]
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


# --- refused addresses -------------------------------------------------------------

SSRF_URLS = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://169.254.169.254/latest/meta-data",
    "http://10.0.0.1/",
    "https://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://2130706433/",
    "http://0x7f.0.0.1/",
    "http://017700000001/",
    "http://127.1/",
    "http://0/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://224.0.0.1/",
    "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
]


@pytest.mark.anyio
@pytest.mark.parametrize("url", SSRF_URLS)
async def test_non_public_addresses_are_refused(public_only: SafeHttpClient, url: str) -> None:
    with pytest.raises(UrlNotAllowed) as info:
        await public_only.get(url, field="image")
    assert info.value.message.startswith("image: URL ")
    assert "non-public address" in info.value.message
    assert "POST /v1/uploads" in info.value.message
    assert info.value.details["field"] == "image"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "host", ["localhost", "2130706433", "0x7f.0.0.1", "017700000001", "127.1", "0"]
)
async def test_resolution_check_catches_what_check_url_cannot(host: str) -> None:
    """The check at connect time stands on its own, whatever the URL check let through."""
    with pytest.raises(_AddressRefused):
        await _PinningBackend(()).connect_tcp(host, 80)


@pytest.mark.anyio
async def test_hostname_resolving_to_loopback_is_refused(public_only: SafeHttpClient) -> None:
    url = "http://localhost:1/ok"
    public_only.check_url(url, field="image")  # a name: the URL check alone cannot know
    with pytest.raises(UrlNotAllowed, match=r"image: URL resolves to 127\.0\.0\.1"):
        await public_only.get(url, field="image")


@pytest.mark.anyio
async def test_one_private_address_among_public_ones_refuses(
    public_only: SafeHttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "10.1.2.3"]})
    with pytest.raises(UrlNotAllowed, match=r"10\.1\.2\.3"):
        await public_only.get("https://mixed.example/a.png", field="image")


@pytest.mark.anyio
async def test_connection_is_pinned_to_the_checked_address_and_keeps_the_host_name(
    client: SafeHttpClient, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _fake_dns(monkeypatch, {"pinned.example": ["127.0.0.1"]})
    port = server.rsplit(":", 1)[1]
    fetched = await client.get(f"http://pinned.example:{port}/host", field="image")
    assert fetched.data == f"pinned.example:{port}".encode()
    assert asked == ["pinned.example"]  # resolved once, by the connecting backend


@pytest.mark.anyio
async def test_redirect_to_address_outside_allowlist_is_refused(
    client: SafeHttpClient, server: str
) -> None:
    port = server.rsplit(":", 1)[1]
    with pytest.raises(UrlNotAllowed, match="127.0.0.2"):
        await client.get(f"{server}/redirect?to=http://127.0.0.2:{port}/ok", field="image")


@pytest.mark.anyio
async def test_redirect_to_name_resolving_outside_allowlist_is_refused(
    client: SafeHttpClient, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_dns(monkeypatch, {"evil.example": ["127.0.0.2"]})
    port = server.rsplit(":", 1)[1]
    with pytest.raises(UrlNotAllowed, match=r"resolves to 127\.0\.0\.2"):
        await client.get(f"{server}/redirect?to=http://evil.example:{port}/ok", field="image")


@pytest.mark.anyio
async def test_redirect_to_other_scheme_is_refused(client: SafeHttpClient, server: str) -> None:
    with pytest.raises(UrlNotAllowed, match="scheme 'file'"):
        await client.get(f"{server}/redirect?to=file:///etc/passwd", field="image")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("https://user:secret@example.com/a.png", "user name or password"),
        ("https:///a.png", "no host"),
        ("not a url", "scheme"),
    ],
)
async def test_bad_urls_are_refused(public_only: SafeHttpClient, url: str, match: str) -> None:
    with pytest.raises(UrlNotAllowed, match=match):
        await public_only.get(url, field="image")


def test_check_url_accepts_public_urls() -> None:
    c = SafeHttpClient(max_bytes=LIMIT, timeout_s=1.0)
    c.check_url("https://example.com/a.png?sig=1", field="image")
    c.check_url("http://8.8.8.8/a.png", field="image")
    c.check_url("http://[2606:4700::1111]/a.png", field="image")


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::7f00:1", False),
        ("::7f00:1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("fe80::1%eth0", False),
    ],
)
def test_address_allowed(address: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address)) is allowed


def test_allow_networks_admit_private_addresses() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8")]
    assert address_allowed(ipaddress.ip_address("10.1.2.3"), nets)
    assert address_allowed(ipaddress.ip_address("::ffff:10.1.2.3"), nets)
    assert not address_allowed(ipaddress.ip_address("192.168.0.1"), nets)


# --- fetching -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_fetches_from_allowlisted_server(client: SafeHttpClient, server: str) -> None:
    fetched = await client.get(f"{server}/ok", field="image")
    assert fetched.data == b"hello bytes"
    assert fetched.content_type == "image/png"
    assert fetched.url == f"{server}/ok"


@pytest.mark.anyio
async def test_follows_redirects_up_to_the_limit(client: SafeHttpClient, server: str) -> None:
    fetched = await client.get(f"{server}/hops/3", field="image")
    assert (fetched.data, fetched.url) == (b"done", f"{server}/hops/0")


@pytest.mark.anyio
async def test_too_many_redirects_fail(client: SafeHttpClient, server: str) -> None:
    with pytest.raises(FetchFailed, match="image: more than 3 redirects"):
        await client.get(f"{server}/hops/4", field="image")


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/big", "/chunked"])
async def test_oversize_is_refused(client: SafeHttpClient, server: str, path: str) -> None:
    with pytest.raises(FetchFailed, match=f"image: the file is larger than the limit of {LIMIT}"):
        await client.get(server + path, field="image")


@pytest.mark.anyio
async def test_slow_server_times_out(server: str) -> None:
    c = SafeHttpClient(allow_networks=LOOPBACK, max_bytes=LIMIT, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match=r"image: fetching the URL took longer than 0\.3 s"):
        await c.get(f"{server}/slow", field="image")
    assert time.monotonic() - started < 1.5
    await c.aclose()


@pytest.mark.anyio
async def test_error_status_fails(client: SafeHttpClient, server: str) -> None:
    with pytest.raises(FetchFailed, match="image: the server answered HTTP 404") as info:
        await client.get(f"{server}/missing", field="image")
    assert info.value.details == {"field": "image", "status": 404}


@pytest.mark.anyio
async def test_connection_refused_fails(client: SafeHttpClient) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchFailed, match="image: could not connect"):
        await client.get(f"http://127.0.0.1:{port}/ok", field="image")


# --- webhooks -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_post_delivers(client: SafeHttpClient, server: str) -> None:
    _Handler.posts.clear()
    response = await client.post(
        f"{server}/hook", content=b'{"a":1}', headers={"X-Sig": "s"}, timeout_s=2.0
    )
    assert (response.status_code, response.content) == (200, b"thanks")
    path, headers, body = _Handler.posts[-1]
    assert (path, headers["X-Sig"], body) == ("/hook", "s", b'{"a":1}')


@pytest.mark.anyio
async def test_post_does_not_follow_redirects(client: SafeHttpClient, server: str) -> None:
    _Handler.posts.clear()
    response = await client.post(f"{server}/redirect", content=b"{}", headers={}, timeout_s=2.0)
    assert response.status_code == 302
    assert [p[0] for p in _Handler.posts] == ["/redirect"]


@pytest.mark.anyio
async def test_post_to_private_address_is_refused(public_only: SafeHttpClient, server: str) -> None:
    with pytest.raises(UrlNotAllowed, match="webhook_url: URL points to 127.0.0.1"):
        await public_only.post(f"{server}/hook", content=b"{}", headers={}, timeout_s=2.0)
    with pytest.raises(UrlNotAllowed, match=r"webhook_url: URL resolves to 127\.0\.0\.1"):
        await public_only.post("http://localhost:1/hook", content=b"{}", headers={}, timeout_s=2.0)
