"""One download of one weight file: Hub or URL into a staging path, then verified.

- Hub files (`hub_download`) go through `huggingface_hub.hf_hub_download` (hf_xet when
  installed) into a staging folder, where an interrupted download resumes.
- URL files (`download_url`) stream with httpx into a `.part` file; after a cut the
  download continues with a `Range` request (from the start when the server ignores
  it). Redirects are followed by hand: the opener checks every hop (the SSRF rules for
  callers' URLs), and a token goes only to the first URL's origin (CivitAI and the
  Hub redirect to signed storage URLs, which must not see it).
- `verify` checks size, sha256 and the safetensors header of what arrived.
- Every failure is a `DownloadFailed` (a reason and what to do, no token in either);
  the LoRA cache and provisioning turn it into their own error with `as_error`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx

from model_service.errors import ServiceError
from model_service.logs import get_logger

log = get_logger("model_service.weights")

_CHUNK = 1 << 20
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_MAX_REDIRECTS = 10
HF_HOSTS = ("huggingface.co", "hf.co")
CIVITAI_HOSTS = ("civitai.com",)


# --- failures -------------------------------------------------------------------------


class DownloadFailed(Exception):
    """Why a file could not be had: `invalid` (the file is wrong) or `unavailable`
    (it could not be fetched; `transient` when trying again may help)."""

    def __init__(
        self,
        kind: Literal["invalid", "unavailable"],
        reason: str,
        advice: str,
        *,
        status: int | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(f"{reason}; {advice}")
        self.kind, self.reason, self.advice = kind, reason, advice
        self.status, self.transient = status, transient

    def as_error(self, error: type[ServiceError], prefix: str, **details: Any) -> ServiceError:
        """The project's error: `<prefix>: <reason>; <advice>`, the HTTP status kept."""
        if self.status is not None:
            details["status"] = self.status
        return error(f"{prefix}: {self.reason}; {self.advice}", **details)


class Stopped(Exception):
    """The caller asked the download to stop (`stop` was set)."""


def _invalid(reason: str, advice: str) -> DownloadFailed:
    return DownloadFailed("invalid", reason, advice)


# --- tokens ---------------------------------------------------------------------------


def _host_in(url: str, hosts: tuple[str, ...]) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in hosts)


def is_civitai(url: str) -> bool:
    return _host_in(url, CIVITAI_HOSTS)


@dataclass(frozen=True)
class Tokens:
    """The operator's credentials: `hf` for the Hub and huggingface.co URLs, `civitai`
    for civitai.com URLs. Never shown (repr) and never sent to any other host."""

    hf: str | None = None
    civitai: str | None = None

    def __repr__(self) -> str:
        return f"Tokens(hf={'set' if self.hf else None}, civitai={'set' if self.civitai else None})"

    def headers_for(self, url: str) -> dict[str, str]:
        """The Authorization header for `url`'s host (the header form, not `?token=`:
        https://developer.civitai.com/site/guide/authentication)."""
        token = self.hf if _host_in(url, HF_HOSTS) else self.civitai if is_civitai(url) else None
        return {"Authorization": f"Bearer {token}"} if token else {}


def login_advice(url: str) -> str:
    if is_civitai(url):
        return (
            "this CivitAI file needs a login: set CIVITAI_TOKEN to a CivitAI API key "
            "(civitai.com, Account settings, API Keys) whose account may download it"
        )
    if _host_in(url, HF_HOSTS):
        return "set HF_TOKEN to a token whose account accepted the model's licence"
    return (
        "give a URL that needs no login (for a Hugging Face URL set HF_TOKEN, for a "
        "CivitAI one CIVITAI_TOKEN)"
    )


# --- progress -------------------------------------------------------------------------


class Progress:
    """Bytes done for one file; written by a download (thread or task), read anywhere.

    Hub downloads report through tqdm bars (Xet uses two: network and disk); each bar
    counts towards the same file, so the file's progress is the furthest bar.
    """

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self._lock = threading.Lock()
        self._position: dict[int, int] = {}
        self._received: dict[int, int] = {}
        self._reported = 0
        self.started = time.monotonic()

    def moved(self, bar: int, position: int, received: int) -> None:
        with self._lock:
            self._position[bar] = position
            self._received[bar] = self._received.get(bar, 0) + received

    @property
    def done(self) -> int:
        with self._lock:
            done = max(self._position.values(), default=0)
        return done if self.total is None else min(self.total, done)

    @property
    def received(self) -> int:
        with self._lock:
            return max(self._received.values(), default=0)

    def take_unreported(self) -> int:
        received = self.received
        delta, self._reported = received - self._reported, received
        return max(0, delta)


def _tqdm_class(progress: Progress | None) -> type[Any]:
    """A silent tqdm class for `hf_hub_download` that feeds `progress`."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class _Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True  # no terminal bars; progress goes to the logs
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self._position = int(kwargs.get("initial") or 0)
            if progress is not None:
                progress.moved(id(self), self._position, 0)

        def update(self, n: float | None = 1) -> bool | None:
            step = int(n or 0)
            self._position += step
            if progress is not None:
                progress.moved(id(self), self._position, step)
            result: bool | None = super().update(n)
            return result

    return _Bar


# --- the Hub --------------------------------------------------------------------------


def hub_failure(
    exc: Exception, repo_id: str, path: str, revision: str, *, where: str
) -> DownloadFailed:
    """huggingface_hub's exceptions, said once for every caller (`where`: what names the
    file, e.g. "the manifest" or "the LoRA source")."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = None
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
    page = f"https://huggingface.co/{repo_id}"
    transient = False
    if isinstance(exc, GatedRepoError):
        reason = f"the repository {repo_id} is gated"
        advice = f"accept its terms on {page} and set HF_TOKEN to a token of that account"
    elif isinstance(exc, RepositoryNotFoundError) or status in (401, 403):
        reason = f"the repository {repo_id} was not found or needs a login"
        advice = (
            f"check <owner>/<repo> in {where}, and set HF_TOKEN if the repository is "
            "private or gated"
        )
    elif isinstance(exc, RevisionNotFoundError):
        reason = f"revision {revision!r} does not exist in {repo_id}"
        advice = f"fix the revision in {where} (a branch, tag or commit)"
    elif isinstance(exc, LocalEntryNotFoundError | httpx2.TransportError):
        # hf_hub_download says LocalEntryNotFound when the Hub cannot be reached
        reason = f"the Hugging Face Hub could not be reached ({type(exc).__name__}: {exc})"
        advice = "check the network (and HF_ENDPOINT if set), then try again"
        transient = True
    elif isinstance(exc, EntryNotFoundError):
        reason = f"{path!r} is not in {repo_id} at revision {revision!r}"
        advice = f"fix the path in {where}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
        advice = "try again; report it if it repeats"
        transient = True
    return DownloadFailed("unavailable", reason, advice, status=status, transient=transient)


def hub_download(
    repo_id: str,
    path: str,
    revision: str,
    stage_dir: Path,
    *,
    token: str | None,
    endpoint: str | None,
    where: str,
    progress: Progress | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Blocking (run it in a thread): the file, under `stage_dir`. `token` None: the
    HF_TOKEN or login that huggingface_hub finds itself. A file over `max_bytes` is
    refused before its download."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        if max_bytes is not None:
            url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)
            meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
            if meta.size is not None and meta.size > max_bytes:
                raise too_large(meta.size, max_bytes)
        downloaded = hf_hub_download(
            repo_id=repo_id,
            filename=path,
            revision=revision,
            local_dir=stage_dir,
            token=token,
            endpoint=endpoint,
            tqdm_class=_tqdm_class(progress),
        )
    except DownloadFailed:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise
        raise hub_failure(exc, repo_id, path, revision, where=where) from exc
    return Path(downloaded)


# --- URLs -----------------------------------------------------------------------------


class Opener(Protocol):
    """Sends one GET without following redirects; the response's body is unread."""

    async def open(self, url: str, headers: Mapping[str, str]) -> httpx.Response: ...


class PlainOpener:
    """For the operator's URLs (a manifest): any address, the environment's proxy."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self._timeout = httpx.Timeout(timeout_s, connect=30.0)
        self._client: httpx.AsyncClient | None = None  # made at the first URL (TLS setup)

    async def open(self, url: str, headers: Mapping[str, str]) -> httpx.Response:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        request = self._client.build_request("GET", url, headers=dict(headers))
        return await self._client.send(request, stream=True)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


def status_failure(status: int, url: str, *, where: str) -> DownloadFailed:
    if status in (401, 403):
        return DownloadFailed(
            "unavailable",
            f"the server answered HTTP {status} (not allowed)",
            login_advice(url),
            status=status,
        )
    if status in (404, 410):
        return DownloadFailed(
            "unavailable",
            f"the server answered HTTP {status} (not found)",
            f"check the URL in {where}",
            status=status,
        )
    return DownloadFailed(
        "unavailable",
        f"the server answered HTTP {status}",
        "check the URL, or try again later",
        status=status,
        transient=status in (408, 429) or status >= 500,
    )


def too_large(size: int | None, limit: int) -> DownloadFailed:
    what = f"it is {size} bytes" if size is not None else "it is too large"
    return _invalid(
        f"{what}, over the limit of {limit} bytes", "use a smaller file (for a LoRA: a lower rank)"
    )


class _Retry(Exception):
    """A transient failure: the next attempt continues the part file."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Want:
    url: str
    part: Path
    headers: Mapping[str, str]
    size: int | None
    max_bytes: int | None
    sha256: bool
    where: str
    named: str  # the URL as the source names it: which login to advise


async def _open_following(opener: Opener, want: _Want, extra: dict[str, str]) -> httpx.Response:
    """The final response after redirects; the token only while the origin is the first's."""
    current = httpx.URL(want.url)
    first = _origin(current)
    for _ in range(_MAX_REDIRECTS + 1):
        headers = {"Accept-Encoding": "identity", **extra}
        if _origin(current) == first:
            headers.update(want.headers)
        response = await opener.open(str(current), headers)
        if not response.is_redirect:
            return response
        await response.aclose()
        try:
            current = current.join(response.headers["location"])
        except (KeyError, httpx.InvalidURL):
            raise DownloadFailed(
                "unavailable",
                "the server redirected to an invalid URL",
                f"check the URL in {want.where}",
            ) from None
    raise DownloadFailed(
        "unavailable", f"more than {_MAX_REDIRECTS} redirects", f"check the URL in {want.where}"
    )


async def _fetch_once(
    opener: Opener, want: _Want, progress: Progress, stop: threading.Event | None
) -> Any:
    """One GET, continuing the part file when it has bytes; the sha256 hasher (or None)."""
    part, size = want.part, want.size
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and offset == size:  # complete; the last run stopped before verifying
        progress.moved(0, size, 0)
        return await asyncio.to_thread(sha256_of, part) if want.sha256 else None
    response = await _open_following(opener, want, {"Range": f"bytes={offset}-"} if offset else {})
    try:
        status = response.status_code
        if status == 416 and offset:
            part.unlink()
            raise _Retry("the server refused to continue the part file; starting again")
        if status >= 400:
            failure = status_failure(status, want.named, where=want.where)
            if failure.transient:
                raise _Retry(failure.reason, status)
            raise failure
        if offset and status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                part.unlink()
                raise _Retry(f"the server sent range {content_range!r}; starting again")
        elif offset and status == 200:
            log.info("server ignored the Range request; downloading from the start", had=offset)
            offset = 0
        elif status != 200:
            raise status_failure(status, want.named, where=want.where)
        length = response.headers.get("Content-Length", "")
        if length.isdigit():
            if size is not None and int(length) != size - offset:
                raise _invalid(
                    f"the server says it is {int(length) + offset} bytes but {want.where} "
                    f"says {size}",
                    f"check the size and the URL in {want.where}",
                )
            if want.max_bytes is not None and int(length) + offset > want.max_bytes:
                raise too_large(int(length) + offset, want.max_bytes)
        limit = size if size is not None else want.max_bytes
        hasher = hashlib.sha256() if want.sha256 else None
        if hasher is not None and offset:
            await asyncio.to_thread(sha256_of, part, hasher)
        position = offset
        progress.moved(0, position, 0)
        with part.open("ab" if offset else "wb") as f:
            async for chunk in response.aiter_raw():  # as it arrives: a cut loses nothing
                if stop is not None and stop.is_set():
                    raise Stopped
                if limit is not None and position + len(chunk) > limit:
                    f.close()
                    part.unlink()
                    if size is None:
                        raise too_large(None, limit)
                    raise _invalid(
                        f"the server sent more than the {size} bytes {want.where} says",
                        f"check the size and the URL in {want.where}",
                    )
                f.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                position += len(chunk)
                progress.moved(0, position, len(chunk))
        if size is not None and position < size:
            raise _Retry(f"the connection ended after {position} of {size} bytes")
        return hasher
    finally:
        await response.aclose()


async def download_url(
    opener: Opener,
    url: str,
    part: Path,
    *,
    where: str,
    headers: Mapping[str, str] | None = None,
    size: int | None = None,
    max_bytes: int | None = None,
    sha256: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    named: str | None = None,
) -> str | None:
    """Download `url` into `part`, resuming after cuts; the sha256 hex digest when
    `sha256`. `size`: the exact size expected (a shorter body is a cut, a longer one is
    refused); without it the body ends the file. `part` stays on failure (to resume).
    `named`: the URL as the source names it, when `url` is a stand-in for it."""
    want = _Want(url, part, headers or {}, size, max_bytes, sha256, where, named or url)
    progress = progress or Progress(size)
    failures = 0
    while True:
        before = progress.received
        try:
            hasher = await _fetch_once(opener, want, progress, stop)
            return None if hasher is None else str(hasher.hexdigest())
        except (_Retry, httpx.TransportError) as exc:
            failures = 1 if progress.received > before else failures + 1
            reason = str(exc) or type(exc).__name__
            if failures > retries:
                raise DownloadFailed(
                    "unavailable",
                    f"the download failed ({reason}; gave up after {failures} failed "
                    "attempt(s) in a row)",
                    "check the network and the URL, then try again",
                    status=exc.status if isinstance(exc, _Retry) else None,
                    transient=True,
                ) from None
            delay = min(30.0, retry_delay_s * 2 ** (failures - 1))
            log.warning("download interrupted; resuming", error=reason, retry_in_s=delay)
            await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                raise Stopped from exc


# --- checks (blocking: run them in a thread) ------------------------------------------


def sha256_of(path: Path, hasher: Any = None) -> Any:
    hasher = hasher if hasher is not None else hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher


def safetensors_header(path: Path) -> dict[str, Any]:
    """The file's safetensors header, its tensors' offsets checked against its size."""
    size = path.stat().st_size
    not_safetensors = _invalid(
        "it is not a safetensors file (the source may have served an error or login page)",
        "give the address of the .safetensors file itself",
    )
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= header_len <= min(size - 8, _MAX_HEADER_BYTES):
            raise not_safetensors
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError too
        raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors
    data_len, end = size - 8 - header_len, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _invalid(
                f"its header names data beyond its {size} bytes (a truncated file?)",
                "check that the source serves the complete file",
            )
        end = max(end, offsets[1])
    if end != data_len:
        raise _invalid(
            f"its size ({size} bytes) does not match its header",
            "check that the source serves the complete, unmodified file",
        )
    return header


@dataclass(frozen=True)
class Verified:
    size: int
    sha256: str
    header: dict[str, Any]


def verify(
    path: Path,
    *,
    where: str,
    size: int | None = None,
    sha256: str | None = None,
    digest: str | None = None,
    max_bytes: int | None = None,
    hash_it: bool = False,
) -> Verified:
    """Size (exact, or at most `max_bytes`), sha256 (`digest`: already computed) and the
    safetensors header; `DownloadFailed` (invalid) when one is wrong. The digest is
    computed when `sha256` or `hash_it` asks for it (else "")."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise _invalid(
            f"it is {actual} bytes but {where} says {size}",
            f"check the size (and the source) in {where}",
        )
    if max_bytes is not None and actual > max_bytes:
        raise too_large(actual, max_bytes)
    if digest is None and (sha256 is not None or hash_it):
        digest = str(sha256_of(path).hexdigest())
    if sha256 is not None and digest != sha256:
        raise _invalid(
            f"sha256 mismatch (got {digest}, {where} says {sha256})",
            f"run again; if it fails again, the source changed or the sha256 in {where} is wrong",
        )
    header = safetensors_header(path)
    return Verified(actual, digest or "", header)
