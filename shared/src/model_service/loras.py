"""A disk cache of LoRA files that jobs name by source (`hf://...` or an `https` URL).

- A LoRA is stored as `root/<key>_<filename>`, where `key` is a hash of its normalized
  source. `root` lies inside ComfyUI's `loras` folder, so a workflow names the file
  `<root.name>/<key>_<filename>`.
- A file gets its final name only once it is complete and checked (a safetensors file
  holding LoRA tensors, not over `max_file_bytes`): it is written to a `.part` file, or a
  staging folder for Hub downloads, then renamed. Leftovers are removed at start-up.
- Concurrent requests for one source share one download.
- A job pins the files it uses (`acquire` / `use`). After each download the least
  recently used unpinned files are deleted until the folder holds at most `max_bytes`.
  "Used" is the file's mtime, bumped on each cache hit, so the order survives restarts.
- Pins live in this process: two processes sharing one folder may evict each other's
  files, and one starting up removes the other's unfinished downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from model_service.errors import (
    FetchFailed,
    LoraInvalid,
    LoraUnavailable,
    ServiceError,
    UrlNotAllowed,
)
from model_service.fetch import SafeHttpClient
from model_service.logs import get_logger

log = get_logger("model_service.loras")

_SUFFIX = ".safetensors"
_MAX_SOURCE_LEN = 2048
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_CACHED_NAME = re.compile(r"[0-9a-f]{16}_.+\.safetensors")
_STAGING = ".staging"
_FORMS = (
    "use hf://<owner>/<repo>/<path/to/file.safetensors>[@<revision>] "
    "or an https:// URL of a .safetensors file"
)


# --- sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSource:
    """Where a LoRA comes from: a Hub file (`repo_id`, `path`, `revision`) or a `url`."""

    normalized: str  # `hf://owner/repo/path@revision`, or the https URL
    filename: str  # the file's base name, made safe for disk and ComfyUI
    url: str | None = None
    repo_id: str | None = None
    path: str | None = None
    revision: str | None = None

    @property
    def key(self) -> str:
        return hashlib.sha256(self.normalized.encode()).hexdigest()[:16]

    @property
    def stored_name(self) -> str:
        return f"{self.key}_{self.filename}"

    def describe(self) -> str:
        """For messages and logs; a URL's query (often a signature) is left out."""
        if self.url is None:
            return self.normalized
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + (
            "?…" if parts.query else ""
        )


def _safe_filename(name: str) -> str:
    stem = _UNSAFE_CHARS.sub("_", name[: -len(_SUFFIX)]).strip("._") or "lora"
    return stem[:100] + _SUFFIX


def _check_path(path: str, value: str, field: str) -> list[str]:
    """The segments of a file path: non-empty, no `.`/`..`, ends in `.safetensors`."""
    segments = path.split("/")
    if not segments[-1].lower().endswith(_SUFFIX):
        raise LoraInvalid(
            f"{field}: {value!r} does not name a .safetensors file; {_FORMS}", field=field
        )
    if any(s in ("", ".", "..") or "\\" in s or not s.isprintable() for s in segments):
        raise LoraInvalid(
            f"{field}: {value!r} has an empty, '.' or '..' path segment or odd characters; "
            f"{_FORMS}",
            field=field,
        )
    return segments


def _parse_hub(value: str, field: str) -> LoraSource:
    body = value[len("hf://") :]
    revision = "main"
    suffix = re.fullmatch(r"(.+\.safetensors)@([^@]+)", body, flags=re.IGNORECASE)
    if suffix:  # hf://owner/repo/file.safetensors@rev
        body, revision = suffix.group(1), suffix.group(2)
    owner, _, rest = body.partition("/")
    repo, _, path = rest.partition("/")
    if "@" in repo and not suffix:  # hf://owner/repo@rev/file.safetensors (HfFileSystem)
        repo, _, revision = repo.partition("@")
    if not (_HUB_NAME.fullmatch(owner) and _HUB_NAME.fullmatch(repo)):
        raise LoraInvalid(
            f"{field}: {value!r} does not start with a valid <owner>/<repo>; {_FORMS}",
            field=field,
        )
    if not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision:
        raise LoraInvalid(
            f"{field}: {revision!r} is not a valid revision (a branch, tag or commit); {_FORMS}",
            field=field,
        )
    segments = _check_path(path, value, field)
    repo_id = f"{owner}/{repo}"
    return LoraSource(
        normalized=f"hf://{repo_id}/{path}@{revision}",
        filename=_safe_filename(segments[-1]),
        repo_id=repo_id,
        path=path,
        revision=revision,
    )


def _parse_url(value: str, field: str) -> LoraSource:
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise LoraInvalid(f"{field}: not a valid URL ({exc}); {_FORMS}", field=field) from None
    if not host or parts.username is not None or parts.password is not None:
        raise LoraInvalid(
            f"{field}: the URL needs a host and no user:password@; {_FORMS}", field=field
        )
    segments = _check_path(unquote(parts.path).removeprefix("/"), value, field)
    shown = f"[{host}]" if ":" in host else host
    scheme = parts.scheme.lower()
    netloc = shown if port in (None, {"https": 443, "http": 80}[scheme]) else f"{shown}:{port}"
    url = urlunsplit((scheme, netloc, parts.path, parts.query, ""))
    return LoraSource(normalized=url, filename=_safe_filename(segments[-1]), url=url)


def parse_lora_source(value: str, *, field: str) -> LoraSource:
    """Parses `hf://<owner>/<repo>/<path>[@<revision>]` or an http(s) `.safetensors` URL.

    Raises `LoraInvalid` naming `field`. Checks only the form; no network access.
    """
    value = value.strip()
    if len(value) > _MAX_SOURCE_LEN:
        raise LoraInvalid(f"{field}: longer than {_MAX_SOURCE_LEN} characters", field=field)
    scheme = value.partition("://")[0].lower()
    if scheme == "hf":
        return _parse_hub(value, field)
    if scheme in ("https", "http"):  # which addresses may be fetched: SafeHttpClient's rules
        return _parse_url(value, field)
    raise LoraInvalid(f"{field}: {value[:200]!r} is not a LoRA source; {_FORMS}", field=field)


# --- failures shared by every waiter of one download -----------------------------------


class _Failure(Exception):
    """A download failure without a field name; each waiter raises it with its own."""

    def __init__(self, error: type[ServiceError], text: str, **details: Any) -> None:
        super().__init__(text)
        self.error, self.text, self.details = error, text, details

    def for_field(self, field: str, source: LoraSource) -> ServiceError:
        return self.error(
            f"{field}: {self.text}", field=field, source=source.describe(), **self.details
        )


def _unavailable(source: LoraSource, reason: str, advice: str, **details: Any) -> _Failure:
    return _Failure(
        LoraUnavailable, f"cannot download LoRA {source.describe()}: {reason}; {advice}", **details
    )


def _invalid(source: LoraSource, problem: str, advice: str) -> _Failure:
    return _Failure(LoraInvalid, f"LoRA {source.describe()} is not usable: {problem}; {advice}")


def _too_large(source: LoraSource, size: int | None, limit: int) -> _Failure:
    what = f"it is {size} bytes" if size is not None else "it is too large"
    return _invalid(
        source, f"{what}, over the limit of {limit} bytes", "use a smaller LoRA (a lower rank)"
    )


def _http_reason(exc: ServiceError) -> str:
    """`SafeHttpClient`'s message without its field prefix and its upload advice."""
    return exc.message.removeprefix("lora: ").split("; ")[0]


def _hub_failure(exc: Exception, source: LoraSource) -> _Failure:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, status = source.repo_id, None
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
    if isinstance(exc, GatedRepoError):
        reason = f"the repository {repo} is gated"
        advice = (
            "use a LoRA from a public repository, or ask the operator to accept its terms "
            "with the account of the service's HF_TOKEN"
        )
    elif isinstance(exc, RepositoryNotFoundError) or status in (401, 403):
        reason = f"the repository {repo} was not found on the Hugging Face Hub or is private"
        advice = "check <owner>/<repo> in the source; private repositories are not supported"
    elif isinstance(exc, RevisionNotFoundError):
        reason = f"revision {source.revision!r} does not exist in {repo}"
        advice = "check the @<revision> of the source (a branch, tag or commit)"
    elif isinstance(exc, LocalEntryNotFoundError | httpx2.TransportError):
        # hf_hub_download says LocalEntryNotFound when the Hub cannot be reached
        reason = f"the Hugging Face Hub could not be reached ({type(exc).__name__}: {exc})"
        advice = "try again later"
    elif isinstance(exc, EntryNotFoundError):
        reason = f"{source.path!r} is not in {repo} at revision {source.revision!r}"
        advice = "check the file path in the source"
    else:
        reason = f"{type(exc).__name__}: {exc}"
        advice = "try again later"
    return _unavailable(source, reason, advice, status=status)


# --- file checks (run in a thread) ---------------------------------------------------------


def _check_lora_file(path: Path, source: LoraSource, max_bytes: int) -> int:
    """The file's size, if it is a safetensors file with LoRA tensors; else `_Failure`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise _too_large(source, size, max_bytes)
    not_safetensors = _invalid(
        source,
        "it is not a safetensors file",
        "give the address of the LoRA's .safetensors file itself, not a web page",
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
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_len, end = size - 8 - header_len, 0
    for info in tensors.values():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _invalid(
                source,
                f"its header names data beyond its {size} bytes (a truncated file?)",
                "check that the source serves the complete file",
            )
        end = max(end, offsets[1])
    if end != data_len:
        raise _invalid(
            source,
            f"its size ({size} bytes) does not match its header",
            "check that the source serves the complete, unmodified file",
        )
    if not any("lora" in name.lower() for name in tensors):
        examples = ", ".join(repr(n) for n in list(tensors)[:3]) or "none"
        raise _invalid(
            source,
            f"it holds no LoRA tensors (no tensor name contains 'lora'; tensors: {examples})",
            "give a LoRA file (lora_down/lora_up or lora_A/lora_B weights), not a full model",
        )
    return size


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _silent_tqdm() -> type[Any]:
    """A tqdm class for `hf_hub_download` that draws no progress bars."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class _Silent(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    return _Silent


# --- the cache ---------------------------------------------------------------------------


class LoraHandle:
    """A cached LoRA pinned for one job; `release()` (idempotent) or use `with`."""

    def __init__(self, cache: LoraCache, source: LoraSource, path: Path) -> None:
        self._cache = cache
        self.source = source
        self.path = path  # absolute
        self.name = f"{path.parent.name}/{path.name}"  # as ComfyUI's `loras` folder lists it
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._unpin(self.path.name)

    def __enter__(self) -> LoraHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"LoraHandle({self.name!r}, released={self._released})"


class LoraCache:
    """LoRA files under `root`, at most `max_bytes` of them beyond those in use.

    `http` fetches `http(s)` sources straight into the cache folder (nothing held in
    memory); give it a `max_bytes` of at least `max_file_bytes` and a `timeout_s` that
    allows such a file (the smaller limit applies). `hf://` sources go through
    `huggingface_hub` with `hf_endpoint` and `hf_token`.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        http: SafeHttpClient,
        hf_endpoint: str | None = None,
        hf_token: str | None = None,
        max_file_bytes: int = 2 * 2**30,
    ) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self._http = http
        self._hf_endpoint = hf_endpoint
        self._hf_token = hf_token
        self._pins: Counter[str] = Counter()  # file name -> handles holding it
        self._downloads: dict[str, asyncio.Task[None]] = {}  # file name -> its one download
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / _STAGING, ignore_errors=True)
        for part in self.root.glob("*.part"):
            _remove(part)
        self._evict()

    # --- using files ---

    async def acquire(self, source: LoraSource, *, field: str) -> LoraHandle:
        """The LoRA's file, downloaded if missing, pinned until the handle is released.

        Raises `LoraInvalid` or `LoraUnavailable` naming `field`.
        """
        path = self.root / source.stored_name
        self._pins[path.name] += 1  # before any await: eviction must not take it
        try:
            if self._touch(path):
                log.debug("LoRA cache hit", source=source.describe(), file=path.name)
            else:
                await self._download_once(source, path, field)
        except BaseException:
            self._unpin(path.name)
            raise
        return LoraHandle(self, source, path)

    @contextlib.asynccontextmanager
    async def use(
        self, sources: Sequence[LoraSource], *, field: str = "loras"
    ) -> AsyncIterator[list[LoraHandle]]:
        """Acquires all (concurrently; fields `<field>[i].source`), releases them on exit.

        When one fails, the others are released and the first failure in list order is raised.
        """
        results = await asyncio.gather(
            *(self.acquire(s, field=f"{field}[{i}].source") for i, s in enumerate(sources)),
            return_exceptions=True,
        )
        handles = [r for r in results if isinstance(r, LoraHandle)]
        try:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            yield handles
        finally:
            for handle in handles:
                handle.release()

    def stats(self) -> dict[str, int]:
        files = self._files()
        return {
            "files": len(files),
            "bytes": sum(size for _, size, _ in files),
            "max_bytes": self.max_bytes,
            "in_use": sum(1 for n in self._pins if self._pins[n] > 0),
        }

    def _unpin(self, name: str) -> None:
        self._pins[name] -= 1
        if self._pins[name] <= 0:
            del self._pins[name]

    @staticmethod
    def _touch(path: Path) -> bool:
        """Marks a cached file as just used; False when it is not there."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except OSError:  # a read-only volume, another owner: usable, but its age stays
            return path.is_file()
        return True

    # --- downloading ---

    async def _download_once(self, source: LoraSource, path: Path, field: str) -> None:
        task = self._downloads.get(path.name)
        if task is None:
            task = asyncio.create_task(self._download(source, path))
            self._downloads[path.name] = task
            task.add_done_callback(partial(self._download_done, path.name))
        try:
            await asyncio.shield(task)  # a waiter's cancel leaves the download to the others
        except _Failure as exc:
            raise exc.for_field(field, source) from None

    def _download_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._downloads.pop(name, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved: no warning
            log.info("LoRA download failed", file=name, error=str(task.exception()))

    async def _download(self, source: LoraSource, path: Path) -> None:
        started = time.monotonic()
        part = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            if source.url is not None:
                await self._fetch_url(source, source.url, part)
            else:
                await asyncio.to_thread(self._fetch_hub, source, part)
            size = await asyncio.to_thread(_check_lora_file, part, source, self.max_file_bytes)
            os.replace(part, path)
        finally:
            _remove(part)
        log.info(
            "LoRA downloaded",
            source=source.describe(),
            file=path.name,
            bytes=size,
            seconds=round(time.monotonic() - started, 2),
        )
        self._evict()

    async def _fetch_url(self, source: LoraSource, url: str, part: Path) -> None:
        try:
            await self._http.download(url, part, field="lora")
        except UrlNotAllowed as exc:
            raise _unavailable(
                source,
                f"the address is not allowed ({_http_reason(exc)})",
                "host the LoRA on a public https server or the Hugging Face Hub",
            ) from None
        except FetchFailed as exc:
            if "limit_bytes" in exc.details:
                raise _too_large(source, None, exc.details["limit_bytes"]) from None
            status = exc.details.get("status")
            advice = (
                "check that the URL is right and publicly readable"
                if status is not None and status < 500
                else "check the URL, or try again later"
            )
            raise _unavailable(source, _http_reason(exc), advice, status=status) from None

    def _fetch_hub(self, source: LoraSource, part: Path) -> None:
        """Runs in a thread: size check, `hf_hub_download` to a staging folder, move to `part`."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

        assert source.repo_id is not None
        assert source.path is not None
        stage = self.root / _STAGING / part.name
        try:
            url = hf_hub_url(
                source.repo_id, source.path, revision=source.revision, endpoint=self._hf_endpoint
            )
            meta = get_hf_file_metadata(url, token=self._hf_token, endpoint=self._hf_endpoint)
            if meta.size is not None and meta.size > self.max_file_bytes:
                raise _too_large(source, meta.size, self.max_file_bytes)
            downloaded = hf_hub_download(
                source.repo_id,
                source.path,
                revision=source.revision,
                endpoint=self._hf_endpoint,
                token=self._hf_token,
                local_dir=stage,
                tqdm_class=_silent_tqdm(),
            )
            assert isinstance(downloaded, str)
            os.replace(downloaded, part)
        except _Failure:
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise
            raise _hub_failure(exc, source) from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    # --- eviction ---

    def _files(self) -> list[tuple[int, int, str]]:
        """(mtime in ns, size, name) of each cached file."""
        files = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if _CACHED_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat(follow_symlinks=False)
                        files.append((st.st_mtime_ns, st.st_size, entry.name))
        return files

    def _evict(self) -> None:
        """Deletes the least recently used unpinned files until the total fits."""
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        for _, size, name in files:
            if total <= self.max_bytes:
                break
            if self._pins[name] > 0:
                continue
            _remove(self.root / name)
            total -= size
            log.info("LoRA evicted from the cache", file=name, bytes=size)
        if total > self.max_bytes:
            log.warning(
                "LoRA cache over its limit: the files in use do not fit",
                bytes=total,
                max_bytes=self.max_bytes,
                in_use=sorted(n for n in self._pins if self._pins[n] > 0),
            )
