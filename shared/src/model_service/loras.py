"""A disk cache of LoRA files that jobs name by source (`hf://...`, an `https` URL or a
CivitAI download URL), on the one download of `model_service.weights`.

- A LoRA is stored as `root/<key>_<filename>`, where `key` is a hash of its normalized
  source. `root` lies inside ComfyUI's `loras` folder, so a workflow names the file
  `<root.name>/<key>_<filename>`. Beside it, `root/.meta/<file>.json` says where it came
  from, its size and sha256 (`GET /v1/loras`).
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
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import TracebackType

import httpx
from pydantic import SecretStr

from model_service.errors import (
    FetchFailed,
    LoraInvalid,
    LoraUnavailable,
    ServiceError,
    UrlNotAllowed,
)
from model_service.fetch import SafeHttpClient
from model_service.logs import get_logger
from model_service.settings import Settings
from model_service.weights.fetch import (
    DownloadFailed,
    Tokens,
    download_url,
    hub_download,
    verify,
)
from model_service.weights.sources import LoraSource, parse_lora_source

__all__ = [
    "CachedLora",
    "LoraCache",
    "LoraHandle",
    "LoraSource",
    "list_cached",
    "parse_lora_source",
]

log = get_logger("model_service.loras")

_CACHED_NAME = re.compile(r"[0-9a-f]{16}_.+\.safetensors")
_STAGING = ".staging"
_META = ".meta"
_WHERE = "the LoRA source"


def cache_dir(settings: Settings) -> Path:
    """A service's LoRA cache: `loras/cache` under the models ComfyUI reads (MODELS_DIR,
    or its `tiny` folder in PROFILE=tiny, as `comfy.engine.models_dir_for` says)."""
    base = settings.models_dir.absolute()
    return (base / "tiny" if settings.profile == "tiny" else base) / "loras" / "cache"


# --- what is cached ---------------------------------------------------------------------


@dataclass(frozen=True)
class CachedLora:
    name: str  # as a workflow names it: `<root.name>/<key>_<filename>`
    source: str | None  # as `LoraSource.describe()` shows it; None for files of old versions
    size_bytes: int
    sha256: str | None
    last_used: str  # ISO 8601, UTC: the file's mtime
    downloaded_at: str | None


def list_cached(root: Path) -> list[CachedLora]:
    """The finished files under `root`, most recently used first (reads no file body)."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        for entry in entries:
            if not (_CACHED_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            meta: dict[str, object] = {}
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads((root / _META / f"{entry.name}.json").read_text())
            found.append(
                (
                    st.st_mtime_ns,
                    CachedLora(
                        name=f"{root.name}/{entry.name}",
                        source=_str_or_none(meta.get("source")),
                        size_bytes=st.st_size,
                        sha256=_str_or_none(meta.get("sha256")),
                        last_used=_iso(st.st_mtime),
                        downloaded_at=_str_or_none(meta.get("downloaded_at")),
                    ),
                )
            )
    return [lora for _, lora in sorted(found, key=lambda item: item[0], reverse=True)]


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


# --- failures ---------------------------------------------------------------------------


def _for_field(exc: DownloadFailed, field: str, source: LoraSource) -> ServiceError:
    """`DownloadFailed` as this field's LoraInvalid or LoraUnavailable (each waiter of
    one shared download gets its own)."""
    if exc.kind == "invalid":
        return exc.as_error(
            LoraInvalid,
            f"{field}: LoRA {source.describe()} is not usable",
            field=field,
            source=source.describe(),
        )
    return exc.as_error(
        LoraUnavailable,
        f"{field}: cannot download LoRA {source.describe()}",
        field=field,
        source=source.describe(),
    )


def _http_reason(exc: ServiceError) -> str:
    """`SafeHttpClient`'s message without its field prefix and its upload advice."""
    return exc.message.removeprefix("lora: ").split("; ")[0]


class _SafeOpener:
    """The weights download's opener on `SafeHttpClient`: every hop checked (SSRF)."""

    def __init__(self, http: SafeHttpClient) -> None:
        self._http = http

    async def open(self, url: str, headers: Mapping[str, str]) -> httpx.Response:
        try:
            return await self._http.open_stream(url, field="lora", headers=headers)
        except UrlNotAllowed as exc:
            raise DownloadFailed(
                "unavailable",
                f"the address is not allowed ({_http_reason(exc)})",
                "host the LoRA on a public https server or the Hugging Face Hub",
            ) from None
        except FetchFailed as exc:
            raise DownloadFailed(
                "unavailable", _http_reason(exc), "check the URL, or try again later"
            ) from None


def _check_lora_file(path: Path, max_bytes: int, digest: str | None) -> tuple[int, str]:
    """(size, sha256) of a safetensors file with LoRA tensors; else `DownloadFailed`."""
    checked = verify(path, where=_WHERE, max_bytes=max_bytes, digest=digest, hash_it=True)
    tensors = [name for name in checked.header if name != "__metadata__"]
    if not any("lora" in name.lower() for name in tensors):
        examples = ", ".join(repr(n) for n in tensors[:3]) or "none"
        raise DownloadFailed(
            "invalid",
            f"it holds no LoRA tensors (no tensor name contains 'lora'; tensors: {examples})",
            "give a LoRA file (lora_down/lora_up or lora_A/lora_B weights), not a full model",
        )
    return checked.size, checked.sha256


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


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
    memory; the smaller of its `max_bytes` and `max_file_bytes` applies, and its
    `timeout_s` to the whole download). `hf://` sources go through `huggingface_hub` with
    `hf_endpoint` and `hf_token` (None: the HF_TOKEN huggingface_hub finds); CivitAI URLs
    get `civitai_token` (`Authorization: Bearer`, to civitai.com only).
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
        civitai_token: SecretStr | str | None = None,
        retries: int = 2,
    ) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self._http = http
        self._hf_endpoint = hf_endpoint
        self._hf_token = hf_token
        if isinstance(civitai_token, SecretStr):
            civitai_token = civitai_token.get_secret_value()
        self._tokens = Tokens(civitai=civitai_token or None)
        self._retries = retries
        self._pins: Counter[str] = Counter()  # file name -> handles holding it
        self._downloads: dict[str, asyncio.Task[None]] = {}  # file name -> its one download
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root / _STAGING, ignore_errors=True)
        for part in self.root.glob("*.part"):
            _remove(part)
        for meta in (self.root / _META).glob("*.json"):
            if not (self.root / meta.stem).is_file():
                _remove(meta)
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

    def entries(self) -> list[CachedLora]:
        """What is cached, most recently used first."""
        return list_cached(self.root)

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
        except DownloadFailed as exc:
            raise _for_field(exc, field, source) from None

    def _download_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._downloads.pop(name, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved: no warning
            log.info("LoRA download failed", file=name, error=str(task.exception()))

    async def _download(self, source: LoraSource, path: Path) -> None:
        started = time.monotonic()
        part = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            digest = None
            if source.url is not None:
                digest = await self._fetch_url(source, source.url, part)
            else:
                await asyncio.to_thread(self._fetch_hub, source, part)
            size, sha256 = await asyncio.to_thread(
                _check_lora_file, part, self.max_file_bytes, digest
            )
            self._write_meta(path, source, size, sha256)
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

    async def _fetch_url(self, source: LoraSource, url: str, part: Path) -> str | None:
        """Into `part`, resumed after a cut; the sha256. A CivitAI source gets the token
        (by its own address: tests serve it elsewhere), its redirect targets do not."""
        try:
            async with asyncio.timeout(self._http.timeout_s):
                return await download_url(
                    _SafeOpener(self._http),
                    url,
                    part,
                    where=_WHERE,
                    headers=self._tokens.headers_for(source.normalized),
                    named=source.normalized,
                    max_bytes=min(self.max_file_bytes, self._http.max_bytes),
                    sha256=True,
                    retries=self._retries,
                )
        except TimeoutError:
            raise DownloadFailed(
                "unavailable",
                f"the download took longer than {self._http.timeout_s:g} s",
                "use a faster host or a smaller LoRA",
            ) from None

    def _fetch_hub(self, source: LoraSource, part: Path) -> None:
        """Runs in a thread: `hub_download` (size checked first) to staging, moved to `part`."""
        assert source.repo_id is not None
        assert source.path is not None
        assert source.revision is not None
        stage = self.root / _STAGING / part.name
        try:
            downloaded = hub_download(
                source.repo_id,
                source.path,
                source.revision,
                stage,
                token=self._hf_token,
                endpoint=self._hf_endpoint,
                where=_WHERE,
                max_bytes=self.max_file_bytes,
            )
            os.replace(downloaded, part)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _write_meta(self, path: Path, source: LoraSource, size: int, sha256: str) -> None:
        meta = {
            "source": source.describe(),  # a URL's query (a signature, say) left out
            "size_bytes": size,
            "sha256": sha256,
            "downloaded_at": _iso(time.time()),
        }
        folder = self.root / _META
        with contextlib.suppress(OSError):  # a listing without it still works
            folder.mkdir(exist_ok=True)
            (folder / f"{path.name}.json").write_text(json.dumps(meta))

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
            _remove(self.root / _META / f"{name}.json")
            total -= size
            log.info("LoRA evicted from the cache", file=name, bytes=size)
        if total > self.max_bytes:
            log.warning(
                "LoRA cache over its limit: the files in use do not fit",
                bytes=total,
                max_bytes=self.max_bytes,
                in_use=sorted(n for n in self._pins if self._pins[n] > 0),
            )
