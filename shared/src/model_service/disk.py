"""A full disk under DATA_DIR, as the service's `DiskFull` error (503, Retry-After)."""

from __future__ import annotations

import errno
import sqlite3
from typing import TYPE_CHECKING

from model_service.errors import DiskFull

if TYPE_CHECKING:  # the worker process imports this module too: no web stack there
    from fastapi import FastAPI

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
RETRY_AFTER_S = 30


def is_full(exc: BaseException) -> bool:
    """An OSError for no space (or quota) left, or SQLite's SQLITE_FULL."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    return False


def disk_full(what: str) -> DiskFull:
    return DiskFull(
        f"{what}: the disk of DATA_DIR is full. Free space in DATA_DIR (old job files go "
        "sooner with a lower OUTPUT_RETENTION_HOURS), then retry",
        retry_after_s=RETRY_AFTER_S,
    )


def install_handler(app: FastAPI) -> None:
    """Requests that fail writing a file (an upload, a job's inputs) for lack of space
    answer 503 `disk_full`; any other OSError goes on to the 500 handler."""

    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if not is_full(exc):
            raise exc
        error = disk_full("the request's files could not be written")
        headers = {"retry-after": str(RETRY_AFTER_S)}
        return JSONResponse({"error": error.to_dict()}, status_code=503, headers=headers)
