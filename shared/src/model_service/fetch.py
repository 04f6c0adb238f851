"""The one way to make HTTP requests to URLs a caller gave us (input files, webhooks).

Guards against server-side request forgery, like runpod-python's `rp_ssrf.safe_get`:

- Only `http` and `https` URLs with a host and without `user:password@` are accepted.
  Plain `http` is allowed because the address check below, not the scheme, is what
  keeps requests away from internal services.
- Every address the host resolves to must be public (`ipaddress` `is_global`, and not
  multicast, unspecified or reserved; IPv4 addresses embedded in IPv6 are checked as
  IPv4) or inside `allow_networks`. One address that is not allowed refuses the URL.
- The connection goes to the address that was checked: resolution happens once, inside
  the network backend that opens the socket, so a second DNS answer cannot point the
  request elsewhere (DNS rebinding). TLS SNI, certificate checks and the Host header
  still use the URL's host name.
- Redirects are followed by hand, at most `max_redirects`, and each hop is checked again.
- Proxies, `.netrc` and other environment settings are never used (`trust_env=False`).
- Responses are capped in size (by Content-Length and while reading) and in total time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpcore
import httpx

from model_service.errors import FetchFailed, UrlNotAllowed

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_UPLOAD_HINT = "use a public URL or upload the file to POST /v1/uploads"
_WEBHOOK_HINT = "use a publicly reachable webhook URL"
RESOLVE_TIMEOUT_S = 5.0  # a webhook's host, resolved at submit
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_POST_BODY_CAP = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None
    url: str  # the final URL, after redirects


class _AddressRefused(Exception):
    """Raised inside the transport; turned into `UrlNotAllowed` with the field's name."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, a non-public address")
        self.host = host
        self.address = address


def _public(ip: IpAddress) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved)


def address_allowed(ip: IpAddress, allow_networks: Sequence[IpNetwork] = ()) -> bool:
    """Whether a request may go to `ip`: inside `allow_networks`, or public.

    IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) addresses are judged
    by their IPv4 address; a 6to4 address (`2002::/16`) also by the IPv4 it embeds.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%")[0])
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in allow_networks):
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:
        return _public(ip) and _public(ip.sixtofour)
    return _public(ip)


def _literal_ip(host: str) -> IpAddress | None:
    """The address a host names without DNS: plain IPs and inet_aton forms (`127.1`, `0x7f..`)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


class _PinningBackend(httpcore.AsyncNetworkBackend):
    """Resolves once, checks every address, and connects to a checked address."""

    def __init__(self, allow_networks: Sequence[IpNetwork]) -> None:
        self._allow = tuple(allow_networks)
        self._inner = httpcore.AnyIOBackend()

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve host {host!r}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve host {host!r}")
        for address in addresses:
            if not address_allowed(ipaddress.ip_address(address), self._allow):
                raise _AddressRefused(host, address)
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        error: Exception | None = None
        for address in await self.resolve(host, port):
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool built on `_PinningBackend`."""

    def __init__(self, backend: _PinningBackend) -> None:
        ssl_context = httpx.create_ssl_context(trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


class SafeHttpClient:
    """Outbound HTTP to caller-supplied URLs. One per process; close with `aclose()`."""

    def __init__(
        self,
        *,
        allow_networks: Sequence[IpNetwork] = (),
        max_bytes: int,
        timeout_s: float,
        max_redirects: int = 5,
    ) -> None:
        self._allow = tuple(allow_networks)
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._max_redirects = max_redirects
        self._backend = _PinningBackend(self._allow)
        self._client = httpx.AsyncClient(
            transport=_PinnedTransport(self._backend),
            trust_env=False,
            follow_redirects=False,
            timeout=timeout_s,
        )

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    async def open_stream(
        self, url: str, *, field: str, headers: Mapping[str, str]
    ) -> httpx.Response:
        """One checked GET that follows no redirect, its body unread (the caller reads
        and closes it): for downloads that follow redirects and resume themselves
        (`model_service.weights`), each hop coming back here to be checked."""
        self.check_url(url, field=field)
        request = self._client.build_request("GET", url, headers=dict(headers))
        return await self._send(request, field, _UPLOAD_HINT)

    def check_url(self, url: str, *, field: str) -> None:
        """Checks a URL without network access (DNS included); raises `UrlNotAllowed`.

        Host names are only checked when connecting; literal IPs (`127.1` too) here.
        """
        self._check(url, field, _UPLOAD_HINT)

    async def check_webhook(self, url: str, *, field: str) -> None:
        """`check_url`, and the addresses the host resolves to now, by the rule every
        delivery follows: a URL refused here would be refused at every attempt. A host
        that does not resolve (yet) passes; its deliveries are retried."""
        self._check(url, field, _WEBHOOK_HINT)
        parsed = httpx.URL(url)
        if _literal_ip(parsed.host) is not None:
            return  # checked above
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                await self._backend.resolve(parsed.host, port)
        except _AddressRefused as exc:
            raise UrlNotAllowed(
                f"{field}: URL resolves to {exc.address}, a non-public address; "
                f"{_WEBHOOK_HINT} (or allow its network in FETCH_ALLOW_NETWORKS)",
                field=field,
            ) from None
        except (httpcore.ConnectError, TimeoutError):
            pass

    def _check(self, url: str, field: str, hint: str) -> None:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise UrlNotAllowed(f"{field}: not a valid URL ({exc}); {hint}", field=field) from None
        if parsed.scheme not in ("http", "https"):
            scheme = parsed.scheme or "none"
            raise UrlNotAllowed(
                f"{field}: URL scheme {scheme!r} is not allowed; use an https URL", field=field
            )
        if not parsed.host:
            raise UrlNotAllowed(f"{field}: URL has no host; use a full https URL", field=field)
        if parsed.userinfo:
            raise UrlNotAllowed(
                f"{field}: URLs with a user name or password are not allowed; "
                "use a URL without `user:password@` (for example a pre-signed URL)",
                field=field,
            )
        ip = _literal_ip(parsed.host)
        if ip is not None and not address_allowed(ip, self._allow):
            shown = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
            raise UrlNotAllowed(
                f"{field}: URL points to {shown}, a non-public address; {hint}", field=field
            )

    async def get(self, url: str, *, field: str) -> Fetched:
        """Fetches a URL's body; raises `UrlNotAllowed` or `FetchFailed`."""
        return await self._fetch(url, field, None)

    async def download(self, url: str, dest: Path, *, field: str) -> Fetched:
        """Like `get`, but the body goes into the file `dest` as it arrives (large files:
        nothing held in memory); `Fetched.data` is empty. `dest` is partial on failure."""
        with dest.open("wb") as out:
            return await self._fetch(url, field, out)

    async def _fetch(self, url: str, field: str, out: BinaryIO | None) -> Fetched:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._get(url, field, out)
        except (TimeoutError, httpx.TimeoutException):
            raise FetchFailed(
                f"{field}: fetching the URL took longer than {self._timeout_s:g} s; "
                "use a faster host or upload the file to POST /v1/uploads",
                field=field,
            ) from None

    async def _get(self, url: str, field: str, out: BinaryIO | None) -> Fetched:
        current = url
        for _ in range(self._max_redirects + 1):
            self.check_url(current, field=field)
            request = self._client.build_request(
                "GET", current, headers={"Accept-Encoding": "identity"}
            )
            response = await self._send(request, field, _UPLOAD_HINT)
            try:
                if response.is_redirect:
                    try:
                        current = str(response.url.join(response.headers["location"]))
                    except httpx.InvalidURL as exc:
                        raise FetchFailed(
                            f"{field}: the server redirected to an invalid URL ({exc}); "
                            f"{_UPLOAD_HINT}",
                            field=field,
                        ) from None
                    continue
                if not response.is_success:
                    raise FetchFailed(
                        f"{field}: the server answered HTTP {response.status_code}; "
                        "check that the URL is right and publicly readable",
                        field=field,
                        status=response.status_code,
                    )
                data = await self._read_capped(response, field, out)
                return Fetched(data, response.headers.get("content-type"), str(response.url))
            except httpx.TimeoutException:
                raise
            except httpx.TransportError as exc:
                raise self._transport_failed(exc, field, _UPLOAD_HINT) from None
            finally:
                await response.aclose()
        raise FetchFailed(
            f"{field}: more than {self._max_redirects} redirects; use the final URL directly",
            field=field,
        )

    async def _send(self, request: httpx.Request, field: str, hint: str) -> httpx.Response:
        try:
            return await self._client.send(request, stream=True)
        except _AddressRefused as exc:
            raise UrlNotAllowed(
                f"{field}: URL resolves to {exc.address}, a non-public address; {hint}",
                field=field,
            ) from None
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            raise self._transport_failed(exc, field, hint) from None

    def _transport_failed(self, exc: httpx.TransportError, field: str, hint: str) -> FetchFailed:
        reason = str(exc) or type(exc).__name__
        what = (
            "could not connect" if isinstance(exc, httpx.ConnectError) else "the connection failed"
        )
        what = f"{what} ({reason})"
        return FetchFailed(f"{field}: {what}; check the URL, or {hint}", field=field)

    async def _read_capped(
        self, response: httpx.Response, field: str, out: BinaryIO | None = None
    ) -> bytes:
        """The body (or b"" when it went to `out`), refused past `max_bytes`."""
        too_large = FetchFailed(
            f"{field}: the file is larger than the limit of {self._max_bytes} bytes; "
            "send a smaller file",
            field=field,
            limit_bytes=self._max_bytes,
        )
        length = response.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self._max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self._max_bytes:
                raise too_large
            if out is None:
                chunks.append(chunk)
            else:
                out.write(chunk)
        return b"".join(chunks)

    async def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: dict[str, str],
        timeout_s: float,
        field: str = "webhook_url",
    ) -> httpx.Response:
        """POSTs once (for webhooks); redirects are not followed, any status is returned.

        The returned response holds at most the first 64 KiB of the body. Raises
        `UrlNotAllowed` (do not retry) or `FetchFailed` (unreachable or too slow; retry).
        """
        self._check(url, field, _WEBHOOK_HINT)
        request = self._client.build_request(
            "POST", url, content=content, headers=headers, timeout=timeout_s
        )
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._send(request, field, _WEBHOOK_HINT)
                try:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk[: _POST_BODY_CAP - len(body)]
                        if len(body) >= _POST_BODY_CAP:
                            break
                except httpx.TimeoutException:
                    raise
                except httpx.TransportError as exc:
                    raise self._transport_failed(exc, field, _WEBHOOK_HINT) from None
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            raise FetchFailed(
                f"{field}: no answer within {timeout_s:g} s; check that the receiver is up",
                field=field,
            ) from None
        skip = {"content-length", "content-encoding", "transfer-encoding"}
        return httpx.Response(
            response.status_code,
            headers=[(k, v) for k, v in response.headers.multi_items() if k.lower() not in skip],
            content=bytes(body),
            request=request,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
