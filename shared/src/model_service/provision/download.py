"""Put a manifest's weight files in place: download, verify, rename atomically.

`provision()` is safe to run from several pods at once on one shared network volume:

- Files already present with the right size are left alone (their contents are not read).
- A disk-space check runs first: the bytes still missing plus a margin must be free.
- Each missing file is downloaded once: a lock file per file (see `lock.py`) makes the
  other downloaders wait for it instead of downloading it too.
- Everything is written under `MODELS_DIR/.staging/` (same file system), verified (size,
  sha256 when the manifest gives it, safetensors header) and only then renamed to
  `MODELS_DIR/<folder>/<name>`. A file under its final name is always complete.
- Hub files go through `huggingface_hub.hf_hub_download` (with `hf_xet` when installed)
  into a per-file staging folder, where an interrupted download resumes. URL files are
  fetched with urllib3 (one stream reads ~4x faster than httpx) into `<file>.part`;
  after a cut the download continues with a `Range` request, or starts again when the
  server does not honour it.
- Up to `parallel` files download at once; waiting for another pod's download does not
  take one of those places.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from urllib.request import getproxies

import urllib3
from prometheus_client import CollectorRegistry, Counter, Gauge

from model_service.errors import ProvisionError
from model_service.logs import get_logger
from model_service.provision.lock import FileLock
from model_service.provision.manifest import STAGING_DIR, HubSource, Manifest, ModelFile

log = get_logger("model_service.provision")

GiB = 2**30
_CHUNK = 1 << 20
_HF_HOSTS = ("huggingface.co", "hf.co")

ProgressCallback = Callable[[ModelFile, int, int], None]
"""Called with (file, bytes done, bytes total) every `progress_every_s` and at the end."""

Outcome = Literal["present", "downloaded", "downloaded_elsewhere"]


def _gb(n: int | float) -> str:
    """Decimal units, as Hugging Face shows sizes."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{int(n)} bytes"


# --- results and metrics ----------------------------------------------------------


@dataclass(frozen=True)
class FileResult:
    file: ModelFile
    outcome: Outcome  # present before, downloaded here, or downloaded by another process
    bytes_downloaded: int  # received by this process (less than the size after a resume)
    seconds: float


@dataclass(frozen=True)
class ProvisionReport:
    service: str
    models_dir: Path
    results: tuple[FileResult, ...]
    seconds: float

    @property
    def downloaded(self) -> list[ModelFile]:
        return [r.file for r in self.results if r.outcome == "downloaded"]

    @property
    def bytes_downloaded(self) -> int:
        return sum(r.bytes_downloaded for r in self.results)


class ProvisionMetrics:
    """Prometheus metrics of provisioning; pass the service's registry to expose them there."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.bytes = Counter(
            "model_download_bytes_total",
            "Weight bytes received, by file",
            ["file"],
            registry=self.registry,
        )
        self.files = Counter(
            "model_download_files_total",
            "Weight files handled, by outcome (present, downloaded, downloaded_elsewhere, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.active = Gauge(
            "model_downloads_active", "Weight files downloading now", registry=self.registry
        )
        self.remaining = Gauge(
            "model_download_remaining_bytes",
            "Bytes of the manifest not yet in place",
            registry=self.registry,
        )


# --- progress -------------------------------------------------------------------------


class _Progress:
    """Bytes done for one file; written by a download thread, read by the event loop.

    Hub downloads report through tqdm bars (Xet uses two: network and disk); each bar
    counts towards the same file, so the file's progress is the furthest bar.
    """

    def __init__(self, file: ModelFile) -> None:
        self.file = file
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
            return min(self.file.size_bytes, max(self._position.values(), default=0))

    @property
    def received(self) -> int:
        with self._lock:
            return max(self._received.values(), default=0)

    def take_unreported(self) -> int:
        received = self.received
        delta, self._reported = received - self._reported, received
        return max(0, delta)


def _tqdm_class(progress: _Progress) -> type[Any]:
    """A silent tqdm class for `hf_hub_download` that feeds `progress`."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class _Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True  # no terminal bars; progress goes to the logs
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self._position = int(kwargs.get("initial") or 0)
            progress.moved(id(self), self._position, 0)

        def update(self, n: float | None = 1) -> bool | None:
            step = int(n or 0)
            self._position += step
            progress.moved(id(self), self._position, step)
            result: bool | None = super().update(n)
            return result

    return _Bar


# --- the sync download workers (run in threads) ---------------------------------------


class _Stopped(Exception):
    """The download was told to stop (lost the lock, or provisioning was canceled)."""


class _Retryable(Exception):
    """A transient failure: the next attempt resumes from the part file."""


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _sha256_of(path: Path, hasher: Any = None) -> Any:
    hasher = hasher if hasher is not None else hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher


def _http_error(file: ModelFile, status: int, url: str) -> ProvisionError:
    where = f"{file.relpath} from {url}"
    if status in (401, 403):
        return ProvisionError(
            f"{where}: the server answered {status} (not allowed). If it is a Hugging Face "
            "URL, set HF_TOKEN to a token whose account accepted the model's licence; "
            "otherwise give a URL that needs no login.",
            file=file.relpath,
            status=status,
        )
    if status in (404, 410):
        return ProvisionError(
            f"{where}: the server answered {status} (not found). Check the URL in the manifest.",
            file=file.relpath,
            status=status,
        )
    return ProvisionError(
        f"{where}: the server answered {status}. Check the URL, or run again later.",
        file=file.relpath,
        status=status,
    )


def _auth_headers(url: str, token: str | None) -> dict[str, str]:
    host = (urlsplit(url).hostname or "").lower()
    if token and any(host == h or host.endswith("." + h) for h in _HF_HOSTS):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _http_pool() -> urllib3.PoolManager:
    """Redirects followed (the Hub sends files to its CDN; urllib3 drops Authorization
    on a redirect to another host), no retries of its own (ours resume), the
    environment's proxy when one is set."""
    retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=10)
    timeout = urllib3.Timeout(connect=30.0, read=60.0)
    proxy = getproxies().get("https")
    if proxy:
        return urllib3.ProxyManager(proxy, retries=retries, timeout=timeout)
    return urllib3.PoolManager(retries=retries, timeout=timeout)


def _fetch_url_once(
    client: urllib3.PoolManager,
    file: ModelFile,
    url: str,
    part: Path,
    headers: dict[str, str],
    progress: _Progress,
    stop: threading.Event,
) -> Any:
    """One GET, continuing `part` when it has bytes. Returns the sha256 hasher (or None)."""
    size = file.size_bytes
    offset = part.stat().st_size if part.exists() else 0
    if offset > size:
        _remove(part)
        offset = 0
    if offset == size:  # complete, but the last run stopped before verifying it
        progress.moved(0, size, 0)
        return _sha256_of(part) if file.sha256 else None
    request_headers = {"Accept-Encoding": "identity", **headers}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    response = client.request("GET", url, headers=request_headers, preload_content=False)
    try:
        status = response.status
        if status == 416 and offset:
            _remove(part)
            raise _Retryable("the server refused to continue the part file; starting again")
        if status in (429, 500, 502, 503, 504):
            raise _Retryable(f"the server answered {status}")
        if status >= 400:
            raise _http_error(file, status, url)
        if offset and status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                _remove(part)
                raise _Retryable(f"the server sent range {content_range!r}; starting again")
        elif offset and status == 200:
            log.info(
                "server ignored the Range request; downloading from the start",
                file=file.relpath,
                had_bytes=offset,
            )
            offset = 0
        elif status != 200:
            raise _http_error(file, status, url)
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != size - offset:
            raise ProvisionError(
                f"{file.relpath}: the server says it is {int(length) + offset} bytes but the "
                f"manifest says {size}. Check size_bytes and the URL in the manifest.",
                file=file.relpath,
            )
        hasher = hashlib.sha256() if file.sha256 else None
        if hasher is not None and offset:
            _sha256_of(part, hasher)
        position = offset
        progress.moved(0, position, 0)
        with part.open("ab" if offset else "wb") as f:
            while chunk := response.read1(_CHUNK):  # as it arrives: a cut loses nothing
                if stop.is_set():
                    raise _Stopped
                if position + len(chunk) > size:
                    f.close()
                    _remove(part)
                    raise ProvisionError(
                        f"{file.relpath}: the server sent more than the {size} bytes the "
                        "manifest says. Check size_bytes and the URL in the manifest.",
                        file=file.relpath,
                    )
                f.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                position += len(chunk)
                progress.moved(0, position, len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if position < size:
            raise _Retryable(f"the connection ended after {position} of {size} bytes")
        return hasher
    finally:
        response.release_conn()


def _fetch_url(
    file: ModelFile,
    url: str,
    part: Path,
    *,
    token: str | None,
    progress: _Progress,
    stop: threading.Event,
    retries: int,
    retry_delay_s: float,
) -> str | None:
    """Download into `part` with resume; returns the sha256 hex digest when one is wanted."""
    failures = 0
    with _http_pool() as client:
        while True:
            before = progress.received
            try:
                hasher = _fetch_url_once(
                    client, file, url, part, _auth_headers(url, token), progress, stop
                )
                return None if hasher is None else str(hasher.hexdigest())
            except (_Retryable, urllib3.exceptions.HTTPError) as exc:
                failures = 1 if progress.received > before else failures + 1
                if failures > retries:
                    raise ProvisionError(
                        f"{file.relpath}: download from {url} failed "
                        f"({exc or type(exc).__name__}; gave up after {failures} failed "
                        "attempt(s) in a row). Check the network and run again: the download "
                        "continues where it stopped.",
                        file=file.relpath,
                    ) from exc
                delay = min(30.0, retry_delay_s * 2 ** (failures - 1))
                log.warning(
                    "download interrupted; resuming",
                    file=file.relpath,
                    error=str(exc) or type(exc).__name__,
                    have_bytes=part.stat().st_size if part.exists() else 0,
                    retry_in_s=delay,
                )
                if stop.wait(delay):
                    raise _Stopped from exc


def _hub_error(file: ModelFile, source: HubSource, exc: Exception) -> ProvisionError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{file.relpath} ({source.describe()})"
    page = f"https://huggingface.co/{source.repo_id}"
    status = None
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
    if isinstance(exc, GatedRepoError):
        hint = (
            f"the repository is gated: accept its terms on {page} and set HF_TOKEN to a "
            "token of that account"
        )
    elif isinstance(exc, RepositoryNotFoundError) or status in (401, 403):
        hint = (
            "the repository was not found or needs a login: check repo_id in the manifest, "
            "and set HF_TOKEN if the repository is private or gated"
        )
    elif isinstance(exc, RevisionNotFoundError):
        hint = f"revision {source.revision!r} does not exist: fix it in the manifest"
    elif isinstance(exc, RemoteEntryNotFoundError):
        hint = f"{source.path!r} is not in the repository: fix the path in the manifest"
    elif isinstance(exc, LocalEntryNotFoundError):
        hint = (
            "the Hub could not be reached: check the network (and HF_ENDPOINT if set), then "
            "run again; the download continues where it stopped"
        )
    else:
        hint = f"{type(exc).__name__}: {exc}. Run again; the download continues where it stopped"
    return ProvisionError(f"{where}: {hint}.", file=file.relpath, status=status)


def _fetch_hub(
    file: ModelFile,
    source: HubSource,
    stage_dir: Path,
    *,
    token: str | None,
    endpoint: str | None,
    progress: _Progress,
) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(
            repo_id=source.repo_id,
            filename=source.path,
            revision=source.revision,
            local_dir=stage_dir,
            token=token,
            endpoint=endpoint,
            tqdm_class=_tqdm_class(progress),
        )
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise
        raise _hub_error(file, source, exc) from exc
    return Path(path)


def _verify(file: ModelFile, path: Path, digest: str | None, cleanup: Callable[[], None]) -> None:
    """Size, sha256 (when the manifest has one) and the safetensors header; else delete."""
    size = path.stat().st_size
    if size != file.size_bytes:
        cleanup()
        raise ProvisionError(
            f"{file.relpath}: downloaded {size} bytes but the manifest says {file.size_bytes}; "
            "the download was deleted. Check size_bytes (and the source) in the manifest.",
            file=file.relpath,
        )
    if file.sha256 is not None:
        if digest is None:
            digest = str(_sha256_of(path).hexdigest())
        if digest != file.sha256:
            cleanup()
            raise ProvisionError(
                f"{file.relpath}: sha256 mismatch (got {digest}, manifest says {file.sha256}); "
                "the download was deleted. Run again; if it fails again, the source changed "
                "or the manifest's sha256 is wrong.",
                file=file.relpath,
            )
    with path.open("rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if not (2 <= header_len <= size - 8 and head[8:9] == b"{"):
        cleanup()
        raise ProvisionError(
            f"{file.relpath}: the downloaded file is not a safetensors file (the source may "
            "have served an error page); it was deleted. Check the source in the manifest.",
            file=file.relpath,
        )


def _place(staged: Path, final: Path) -> None:
    """Rename into place atomically (copy to a hidden name first across file systems)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staged, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        hidden = final.with_name(f".{final.name}.partial")
        shutil.copyfile(staged, hidden)
        os.replace(hidden, final)
        _remove(staged)
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- disk space -------------------------------------------------------------------------


def _staged_bytes(stage_base: Path) -> int:
    total = 0
    part = stage_base.with_name(stage_base.name + ".part")
    with contextlib.suppress(OSError):
        total += part.stat().st_size
    hub_dir = stage_base.with_name(stage_base.name + ".hub")
    if hub_dir.is_dir():
        for p in hub_dir.rglob("*"):
            with contextlib.suppress(OSError):
                if p.is_file():
                    total += p.stat().st_size
    return total


def check_disk_space(
    models_dir: Path, files: list[ModelFile], margin_bytes: int = GiB
) -> tuple[int, int]:
    """Raise `ProvisionError` unless the missing bytes plus `margin_bytes` are free.

    Bytes already staged by an interrupted download count as done. Returns (needed, free).
    """
    staging = models_dir / STAGING_DIR
    missing = sum(max(0, f.size_bytes - _staged_bytes(staging / _stage_key(f))) for f in files)
    needed = missing + margin_bytes
    free = shutil.disk_usage(models_dir).free
    if free < needed:
        raise ProvisionError(
            f"not enough disk space in {models_dir}: {_gb(missing)} still to download plus a "
            f"{_gb(margin_bytes)} margin needs {_gb(needed)}, but only {_gb(free)} is free. "
            f"Free {_gb(needed - free)} or use a bigger volume.",
            needed_bytes=needed,
            free_bytes=free,
        )
    return needed, free


def _stage_key(file: ModelFile) -> str:
    return f"{file.folder.replace('/', '__')}__{file.name}"


# --- orchestration ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    models_dir: Path
    hf_token: str | None
    hf_endpoint: str | None
    on_progress: ProgressCallback | None
    metrics: ProvisionMetrics | None
    stale_after_s: float
    heartbeat_s: float
    poll_s: float
    retries: int
    retry_delay_s: float
    progress_every_s: float


class _Provisioner:
    def __init__(self, opts: _Options, parallel: int) -> None:
        self.opts = opts
        self.staging = opts.models_dir / STAGING_DIR
        self.slots = asyncio.Semaphore(parallel)
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="provision")

    async def file(self, file: ModelFile) -> FileResult:
        opts = self.opts
        started = time.monotonic()
        lock = FileLock(self.staging / f"{_stage_key(file)}.lock", stale_after_s=opts.stale_after_s)
        waited = False
        next_wait_log = 0.0
        while True:
            if file.is_present(opts.models_dir):
                outcome: Outcome = "downloaded_elsewhere" if waited else "present"
                return FileResult(file, outcome, 0, time.monotonic() - started)
            async with self.slots:
                if await asyncio.to_thread(self._take, lock, file):
                    try:
                        result = await self._download_locked(file, lock, started)
                    finally:
                        await asyncio.to_thread(lock.release)
                    if result is not None:
                        return result
            waited = True
            if time.monotonic() >= next_wait_log:
                log.info(
                    "waiting for another process to download the file",
                    file=file.relpath,
                    holder=await asyncio.to_thread(lock.holder),
                )
                next_wait_log = time.monotonic() + opts.progress_every_s
            await asyncio.sleep(opts.poll_s)

    def _take(self, lock: FileLock, file: ModelFile) -> bool:
        if lock.try_acquire():
            return True
        holder = lock.holder()
        if lock.break_if_stale() and lock.try_acquire():
            if holder != "unknown":
                log.warning("took over a stale download lock", file=file.relpath, holder=holder)
            return True
        return False

    async def _download_locked(
        self, file: ModelFile, lock: FileLock, started: float
    ) -> FileResult | None:
        """Download while holding the lock; None when the lock was lost meanwhile."""
        opts = self.opts
        if file.is_present(opts.models_dir):  # finished by another process just before
            return FileResult(file, "downloaded_elsewhere", 0, time.monotonic() - started)
        progress = _Progress(file)
        stop = threading.Event()
        lost = threading.Event()
        tasks = [
            asyncio.create_task(self._heartbeat(lock, stop, lost)),
            asyncio.create_task(self._report_loop(progress)),
        ]
        if opts.metrics is not None:
            opts.metrics.active.inc()
        log.info(
            "downloading",
            file=file.relpath,
            source=file.source.describe(),
            size=_gb(file.size_bytes),
        )
        loop = asyncio.get_running_loop()
        try:
            staged = await loop.run_in_executor(
                self.pool, self._fetch_and_verify, file, progress, stop
            )
            if lost.is_set() or not await asyncio.to_thread(lock.owned):
                log.warning("lost the download lock; not placing the file", file=file.relpath)
                return None
            await asyncio.to_thread(_place, staged, file.path(opts.models_dir))
        except _Stopped:
            if lost.is_set():
                log.warning("lost the download lock; stopped downloading", file=file.relpath)
                return None
            raise
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            if opts.metrics is not None:
                opts.metrics.active.dec()
                opts.metrics.bytes.labels(file.relpath).inc(progress.take_unreported())
        with contextlib.suppress(OSError):
            shutil.rmtree(self.staging / f"{_stage_key(file)}.hub")
        self._report(progress, final=True)
        seconds = time.monotonic() - progress.started
        log.info(
            "downloaded",
            file=file.relpath,
            received=_gb(progress.received),
            seconds=round(seconds, 1),
            mb_per_s=round(progress.received / max(seconds, 1e-6) / 1e6, 1),
        )
        return FileResult(file, "downloaded", progress.received, time.monotonic() - started)

    def _fetch_and_verify(
        self, file: ModelFile, progress: _Progress, stop: threading.Event
    ) -> Path:
        opts = self.opts
        stage_base = self.staging / _stage_key(file)
        if isinstance(file.source, HubSource):
            stage_dir = stage_base.with_name(stage_base.name + ".hub")
            staged = _fetch_hub(
                file,
                file.source,
                stage_dir,
                token=opts.hf_token,
                endpoint=opts.hf_endpoint,
                progress=progress,
            )
            if stop.is_set():
                raise _Stopped
            _verify(file, staged, None, lambda: shutil.rmtree(stage_dir, ignore_errors=True))
            return staged
        part = stage_base.with_name(stage_base.name + ".part")
        digest = _fetch_url(
            file,
            file.source.url,
            part,
            token=opts.hf_token,
            progress=progress,
            stop=stop,
            retries=opts.retries,
            retry_delay_s=opts.retry_delay_s,
        )
        _verify(file, part, digest, lambda: _remove(part))
        return part

    async def _heartbeat(
        self, lock: FileLock, stop: threading.Event, lost: threading.Event
    ) -> None:
        while True:
            await asyncio.sleep(self.opts.heartbeat_s)
            if not await asyncio.to_thread(lock.heartbeat):
                lost.set()
                stop.set()
                return

    async def _report_loop(self, progress: _Progress) -> None:
        while True:
            await asyncio.sleep(self.opts.progress_every_s)
            self._report(progress, final=False)

    def _report(self, progress: _Progress, *, final: bool) -> None:
        opts = self.opts
        file = progress.file
        done = file.size_bytes if final else progress.done
        if opts.metrics is not None:
            opts.metrics.bytes.labels(file.relpath).inc(progress.take_unreported())
        if not final:
            seconds = time.monotonic() - progress.started
            log.info(
                "download progress",
                file=file.relpath,
                done=_gb(done),
                total=_gb(file.size_bytes),
                percent=round(100 * done / file.size_bytes, 1),
                mb_per_s=round(progress.received / max(seconds, 1e-6) / 1e6, 1),
            )
        if opts.on_progress is not None:
            try:
                opts.on_progress(file, done, file.size_bytes)
            except Exception:
                log.exception("on_progress callback failed", file=file.relpath)


def _combine(errors: list[ProvisionError], total: int) -> ProvisionError:
    if len(errors) == 1:
        return errors[0]
    return ProvisionError(
        f"{len(errors)} of {total} model files failed: " + " | ".join(e.message for e in errors),
        failures=[e.to_dict() for e in errors],
    )


async def provision(
    manifest: Manifest,
    models_dir: Path,
    *,
    parallel: int = 3,
    hf_token: str | None = None,
    on_progress: ProgressCallback | None = None,
    metrics: ProvisionMetrics | None = None,
    hf_endpoint: str | None = None,
    disk_margin_bytes: int = GiB,
    stale_after_s: float = 120.0,
    heartbeat_s: float | None = None,
    poll_s: float = 1.0,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    progress_every_s: float = 10.0,
) -> ProvisionReport:
    """Make every file of `manifest` present under `models_dir`; raise `ProvisionError` if not.

    `hf_token`: for Hub files (None: huggingface_hub's default, `HF_TOKEN` or the stored
    login) and for URLs on huggingface.co. `hf_endpoint`: a Hub mirror (None: `HF_ENDPOINT`
    or huggingface.co). A file that fails does not stop the others; the error then lists
    every failure. Lock timing: see `lock.py` (`heartbeat_s` defaults to `stale_after_s/8`).
    """
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    started = time.monotonic()
    models_dir = Path(models_dir)
    try:
        (models_dir / STAGING_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProvisionError(
            f"cannot create {models_dir / STAGING_DIR} ({exc.strerror}): check that MODELS_DIR "
            "points to a writable volume.",
        ) from exc
    missing = manifest.missing(models_dir)
    missing_bytes = sum(f.size_bytes for f in missing)
    if metrics is not None:
        metrics.remaining.set(missing_bytes)
    log.info(
        "provisioning models",
        service=manifest.service,
        models_dir=str(models_dir),
        files=len(manifest.files),
        missing=len(missing),
        missing_size=_gb(missing_bytes),
    )
    if missing:
        await asyncio.to_thread(check_disk_space, models_dir, missing, disk_margin_bytes)
    opts = _Options(
        models_dir=models_dir,
        hf_token=hf_token,
        hf_endpoint=hf_endpoint,
        on_progress=on_progress,
        metrics=metrics,
        stale_after_s=stale_after_s,
        heartbeat_s=heartbeat_s if heartbeat_s is not None else stale_after_s / 8,
        poll_s=poll_s,
        retries=retries,
        retry_delay_s=retry_delay_s,
        progress_every_s=progress_every_s,
    )
    provisioner = _Provisioner(opts, parallel)
    remaining = missing_bytes

    async def one(file: ModelFile) -> FileResult | ProvisionError:
        nonlocal remaining
        try:
            result = await provisioner.file(file)
        except ProvisionError as exc:
            error = exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                error = ProvisionError(
                    f"{file.relpath}: the disk filled up while downloading ({models_dir}). "
                    "Free space or use a bigger volume, then run again.",
                    file=file.relpath,
                )
            else:
                error = ProvisionError(
                    f"{file.relpath}: {exc}. Check MODELS_DIR and run again.", file=file.relpath
                )
        except Exception as exc:  # a bug: report it with the file instead of losing the others
            log.exception("unexpected error while provisioning", file=file.relpath)
            error = ProvisionError(
                f"{file.relpath}: unexpected {type(exc).__name__}: {exc}. Run again; report "
                "it if it repeats.",
                file=file.relpath,
            )
        else:
            if file in missing:
                remaining -= file.size_bytes
            if metrics is not None:
                metrics.files.labels(result.outcome).inc()
                metrics.remaining.set(remaining)
            return result
        log.error("model file failed", file=file.relpath, error=error.message)
        if metrics is not None:
            metrics.files.labels("failed").inc()
        return error

    try:
        outcomes = await asyncio.gather(*(one(f) for f in manifest.files))
    finally:
        provisioner.pool.shutdown(wait=False, cancel_futures=True)
    errors = [o for o in outcomes if isinstance(o, ProvisionError)]
    if errors:
        raise _combine(errors, len(manifest.files))
    results = tuple(o for o in outcomes if isinstance(o, FileResult))
    report = ProvisionReport(manifest.service, models_dir, results, time.monotonic() - started)
    log.info(
        "models in place",
        service=manifest.service,
        downloaded=len(report.downloaded),
        received=_gb(report.bytes_downloaded),
        seconds=round(report.seconds, 1),
    )
    return report
