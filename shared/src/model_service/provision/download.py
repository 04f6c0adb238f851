"""Put a manifest's weight files in place: download, verify, rename atomically.

`provision()` is safe to run from several pods at once on one shared network volume:

- Files already present with the right size are left alone (their contents are not read).
- A disk-space check runs first: the bytes still missing plus a margin must be free.
- Each missing file is downloaded once: a lock file per file (see `lock.py`) makes the
  other downloaders wait for it instead of downloading it too.
- Everything is written under `MODELS_DIR/.staging/` (same file system), verified (size,
  sha256 when the manifest gives it, safetensors header) and only then renamed to
  `MODELS_DIR/<folder>/<name>`. A file under its final name is always complete.
- The download itself is `model_service.weights` (shared with the LoRA cache): Hub
  files through `huggingface_hub` into a per-file staging folder, URL files with httpx
  into `<file>.part`, both resumed after a cut; the operator's HF_TOKEN and
  CIVITAI_TOKEN go to their own hosts only.
- Up to `parallel` files download at once; waiting for another pod's download does not
  take one of those places.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from model_service.errors import ProvisionError
from model_service.logs import get_logger
from model_service.provision.lock import FileLock
from model_service.provision.manifest import STAGING_DIR, HubSource, Manifest, ModelFile
from model_service.weights.fetch import (
    DownloadFailed,
    PlainOpener,
    Progress,
    Stopped,
    Tokens,
    download_url,
    hub_download,
    verify,
)

log = get_logger("model_service.provision")

GiB = 2**30
_WHERE = "the manifest"

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


# --- the download of one file, on model_service.weights ------------------------------


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _provision_error(file: ModelFile, exc: DownloadFailed, *, deleted: bool) -> ProvisionError:
    after = (
        "; the download was deleted"
        if deleted
        else "; run again and the download continues where it stopped"
        if exc.transient
        else ""
    )
    return ProvisionError(
        f"{file.relpath} from {file.source.describe()}: {exc.reason}; {exc.advice}{after}.",
        file=file.relpath,
        **({"status": exc.status} if exc.status is not None else {}),
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
    tokens: Tokens
    hf_endpoint: str | None
    on_progress: ProgressCallback | None
    metrics: ProvisionMetrics | None
    stale_after_s: float
    heartbeat_s: float
    poll_s: float
    retries: int
    retry_delay_s: float
    progress_every_s: float


class _Progress(Progress):
    def __init__(self, file: ModelFile) -> None:
        super().__init__(file.size_bytes)
        self.file = file


class _Provisioner:
    def __init__(self, opts: _Options, parallel: int) -> None:
        self.opts = opts
        self.opener = PlainOpener()
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
        try:
            staged = await self._fetch_and_verify(file, progress, stop)
            if lost.is_set() or not await asyncio.to_thread(lock.owned):
                log.warning("lost the download lock; not placing the file", file=file.relpath)
                return None
            await asyncio.to_thread(_place, staged, file.path(opts.models_dir))
        except Stopped:
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

    async def _fetch_and_verify(
        self, file: ModelFile, progress: _Progress, stop: threading.Event
    ) -> Path:
        """The file, downloaded and verified, in staging; `Stopped` when told to stop."""
        opts = self.opts
        stage_base = self.staging / _stage_key(file)
        staged: Path
        try:
            if isinstance(file.source, HubSource):
                stage_dir = stage_base.with_name(stage_base.name + ".hub")
                fetch = partial(
                    hub_download,
                    file.source.repo_id,
                    file.source.path,
                    file.source.revision,
                    stage_dir,
                    token=opts.tokens.hf,
                    endpoint=opts.hf_endpoint,
                    where=_WHERE,
                    progress=progress,
                )
                staged = await asyncio.get_running_loop().run_in_executor(self.pool, fetch)
                if stop.is_set():
                    raise Stopped
                digest, cleanup = None, partial(shutil.rmtree, stage_dir, ignore_errors=True)
            else:
                staged = stage_base.with_name(stage_base.name + ".part")
                digest = await download_url(
                    self.opener,
                    file.source.url,
                    staged,
                    where=_WHERE,
                    headers=opts.tokens.headers_for(file.source.url),
                    size=file.size_bytes,
                    sha256=file.sha256 is not None,
                    progress=progress,
                    stop=stop,
                    retries=opts.retries,
                    retry_delay_s=opts.retry_delay_s,
                )
                cleanup = partial(_remove, staged)
        except DownloadFailed as exc:
            raise _provision_error(file, exc, deleted=False) from None
        try:
            await asyncio.to_thread(
                verify,
                staged,
                where=_WHERE,
                size=file.size_bytes,
                sha256=file.sha256,
                digest=digest,
            )
        except DownloadFailed as exc:
            await asyncio.to_thread(cleanup)
            raise _provision_error(file, exc, deleted=True) from None
        return staged

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
    civitai_token: str | None = None,
) -> ProvisionReport:
    """Make every file of `manifest` present under `models_dir`; raise `ProvisionError` if not.

    `hf_token`: for Hub files (None: huggingface_hub's default, `HF_TOKEN` or the stored
    login) and for URLs on huggingface.co; `civitai_token` for civitai.com URLs.
    `hf_endpoint`: a Hub mirror (None: `HF_ENDPOINT` or huggingface.co). A file that
    fails does not stop the others; the error then lists every failure. Lock timing: see
    `lock.py` (`heartbeat_s` defaults to `stale_after_s/8`).
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
        tokens=Tokens(hf=hf_token, civitai=civitai_token),
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
        await provisioner.opener.aclose()
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
