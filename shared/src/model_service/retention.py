"""Deletes job files and uploads older than OUTPUT_RETENTION_HOURS, and job records (with
a long video's parts, deliveries and upload records) older than JOB_RECORD_RETENTION_DAYS.
Files never outlive their record: with records kept shorter than outputs (or outputs kept
forever, 0), files go at the record's time.

A pass runs in a worker thread (`asyncio.to_thread`). Its writes publish to the store's
change feed like any other: marking outputs expired is an OTHER change (no listener wants
it, so it costs nothing), and one a listener wanted would be handed to the event loop
(`ChangeFeed.bind`); deleting records publishes nothing."""

import asyncio
import shutil
import time
from pathlib import Path

from model_service.jobs.record import Job
from model_service.jobs.store import RetentionStore
from model_service.logs import get_logger
from model_service.settings import Settings

log = get_logger("model_service.retention")

PAGE = 500  # jobs read per store call
# graphs deleted per store transaction: the API waits for the store's lock meanwhile
# (bench/retention.py: 100 halves the GET p99 during a prune against 500)
PRUNE_PAGE = 100


def sweep(
    settings: Settings, store: RetentionStore, held_by: str = "", now: float | None = None
) -> int:
    """One pass; returns how many jobs had their files deleted. `held_by`: in a fleet,
    this pod's URL (each pod deletes the files of the jobs it ran)."""
    now = now or time.time()
    cutoff = files_cutoff(settings, now)
    expired = 0
    if cutoff is not None:
        expired = _expire(settings, store, held_by, cutoff)
    pruned = prune(settings, store, held_by, now)
    if cutoff is not None:
        if held_by:
            _copies(settings, store, held_by, cutoff)
        if settings.uploads_dir.is_dir():
            for path in settings.uploads_dir.iterdir():
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
    if expired or pruned:
        log.info("retention deleted job files and records", jobs=expired, records=pruned)
    return expired


def files_cutoff(settings: Settings, now: float) -> float | None:
    """Files older than this go: OUTPUT_RETENTION_HOURS, never past the record's time
    (JOB_RECORD_RETENTION_DAYS); None when both keep forever."""
    kept = [
        seconds
        for seconds in (
            settings.output_retention_hours * 3600,
            settings.job_record_retention_days * 86400,
        )
        if seconds > 0
    ]
    return now - min(kept) if kept else None


def _expire(settings: Settings, store: RetentionStore, held_by: str, cutoff: float) -> int:
    """Delete the files of this pod's jobs finished before `cutoff` and mark them."""
    expired = 0
    after: tuple[float, str] | None = None
    while True:  # a page at a time: the store's lock and our memory stay small
        page = store.finished_before(cutoff, limit=PAGE, after=after)
        if not page:
            break
        after = (page[-1].finished_at or 0.0, page[-1].id)
        for job in page:
            if job.held_by == held_by:
                shutil.rmtree(settings.job_dir(job.id), ignore_errors=True)
                # not synced: lost to a power cut, the next pass marks it again
                store.update(job.id, _mark_expired, durable=False)
                expired += 1
        if len(page) < PAGE:
            break
    return expired


def prune(
    settings: Settings, store: RetentionStore, held_by: str = "", now: float | None = None
) -> int:
    """Delete the records of jobs finished more than JOB_RECORD_RETENTION_DAYS ago,
    PRUNE_PAGE graphs per store transaction, and their folders where this pod holds them
    (the others' are copies: `_copies` on their pods); then the old upload records.
    Returns how many job records went."""
    if settings.job_record_retention_days <= 0:
        return 0
    cutoff = (now or time.time()) - settings.job_record_retention_days * 86400
    pruned = 0
    while page := store.prune_finished(cutoff, limit=PRUNE_PAGE):
        for job_id, holder in page:
            if holder == held_by:
                shutil.rmtree(settings.job_dir(job_id), ignore_errors=True)
        pruned += len(page)
    while store.prune_uploads(cutoff, limit=PAGE) == PAGE:
        pass
    return pruned


def _mark_expired(record: Job) -> None:
    record.outputs_expired = True


def _copies(settings: Settings, store: RetentionStore, held_by: str, cutoff: float) -> None:
    """A fleet pod also has files of jobs other pods ran: the inputs of the jobs it took
    the requests of, and the parts' files it fetched for a long video. Deleted once the
    job is finished (or its record gone) and the folder untouched since `cutoff`."""
    jobs_dir = settings.job_dir("-").parent
    if not jobs_dir.is_dir():
        return
    for folder in jobs_dir.iterdir():
        if not folder.is_dir() or _last_change(folder) >= cutoff:
            continue
        job = store.find(folder.name)
        if job is None or (job.held_by != held_by and job.status.is_terminal):
            shutil.rmtree(folder, ignore_errors=True)


def _last_change(folder: Path) -> float:
    """The newest change to the folder or its sub-folders (files are written once)."""
    folders = [folder, *(path for path in folder.iterdir() if path.is_dir())]
    return max(path.stat().st_mtime for path in folders)


async def step(
    settings: Settings, store: RetentionStore, held_by: str = "", every_s: float = 600.0
) -> None:
    """One pass of the retention task (`background.TaskHealth`), then its pause."""
    await asyncio.to_thread(sweep, settings, store, held_by)
    await asyncio.sleep(every_s)
