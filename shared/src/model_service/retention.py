"""Deletes job files and uploads older than OUTPUT_RETENTION_HOURS (records stay)."""

import asyncio
import shutil
import time

from model_service.errors import StoreUnavailable
from model_service.jobs.record import Job
from model_service.jobs.store import JobStore
from model_service.logs import get_logger
from model_service.settings import Settings

log = get_logger("model_service.retention")


def sweep(settings: Settings, store: JobStore, held_by: str = "", now: float | None = None) -> int:
    """One pass; returns how many jobs had their files deleted. `held_by`: in a fleet,
    this pod's URL (each pod deletes the files of the jobs it ran)."""
    if settings.output_retention_hours <= 0:
        return 0
    cutoff = (now or time.time()) - settings.output_retention_hours * 3600
    expired = [job for job in store.finished_before(cutoff) if job.held_by == held_by]
    for job in expired:
        shutil.rmtree(settings.job_dir(job.id), ignore_errors=True)

        def mark(record: Job) -> None:
            record.outputs_expired = True

        store.update(job.id, mark)
    if settings.uploads_dir.is_dir():
        for path in settings.uploads_dir.iterdir():
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
    if expired:
        log.info("retention deleted job files", jobs=len(expired))
    return len(expired)


async def run_forever(
    settings: Settings, store: JobStore, held_by: str = "", every_s: float = 600.0
) -> None:
    while True:
        try:
            await asyncio.to_thread(sweep, settings, store, held_by)
        except StoreUnavailable as exc:  # a fleet's Redis is down: next pass
            log.warning("retention pass skipped", error=exc.message)
        await asyncio.sleep(every_s)
