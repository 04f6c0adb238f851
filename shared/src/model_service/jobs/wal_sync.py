"""Group commit for the SQLite store: the WAL's fsync, off the event loop, shared.

A job's creation is committed on the event loop without an fsync (WAL with
synchronous=NORMAL: a few writes into the page cache) and is then made durable by
`WalSync.sync()`, which fsyncs the WAL file in its own thread. That is what
synchronous=FULL does at each commit (SQLite: "the WAL file is synchronized after each
transaction commit"), but the event loop goes on meanwhile, and every commit made
before a sync begins shares it: ten submissions during one slow fsync (a busy or a
network disk) cost one more fsync, not ten on the loop. The caller answers only once
its sync is done, so a 202 still means "on disk".

The WAL's checkpoints (copying it into the database file, two fsyncs) run here too, at
most once a `CHECKPOINT_EVERY_S`, on a connection of this thread, instead of inside
whichever commit on the loop crossed SQLite's page threshold (the store raises that
threshold to `BACKSTOP_PAGES`, for when no sync runs).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

from model_service.disk import disk_full, is_full

CHECKPOINT_EVERY_S = 1.0
BACKSTOP_PAGES = 10_000  # the store's wal_autocheckpoint (SQLite's default: 1000)


class WalSync:
    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path
        self._wal = Path(f"{db_path}-wal")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="wal-sync")
        self._started = 0  # syncs begun
        self._done = 0  # syncs finished: every commit before the n-th began is on disk
        self._task: asyncio.Future[None] | None = None
        self._dir_synced = False
        self._checkpointer: sqlite3.Connection | None = None
        self._last_checkpoint = 0.0
        self._closed = threading.Event()

    async def sync(self) -> None:
        """Returns once every commit made before this call is on disk."""
        needed = self._started + 1  # a sync that begins after now covers our commits
        while self._done < needed:
            if self._task is None:
                self._task = asyncio.ensure_future(self._one())
            await asyncio.shield(self._task)

    async def _one(self) -> None:
        self._started += 1
        number = self._started
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._fsync_and_checkpoint)
        finally:
            self._task = None
        self._done = max(self._done, number)

    def _fsync_and_checkpoint(self) -> None:
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:  # no WAL (nothing written since the last close)
            fd = os.open(self._db_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if is_full(exc):
                raise disk_full("the job store could not be synced to disk") from exc
            raise
        finally:
            os.close(fd)
        if not self._dir_synced:  # the WAL file's own directory entry, once
            _fsync_dir(self._db_path.parent)
            self._dir_synced = True
        if time.monotonic() - self._last_checkpoint >= CHECKPOINT_EVERY_S:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (PASSIVE: never waits for a writer); the
        next commit then starts the WAL from its beginning. In this thread only."""
        if self._closed.is_set():
            return
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self._db_path, check_same_thread=False)
            self._checkpointer.execute("PRAGMA busy_timeout=0")
        self._last_checkpoint = time.monotonic()
        with suppress(sqlite3.OperationalError):  # busy: a later sync tries again
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def close(self) -> None:
        self._closed.set()

        def close_checkpointer() -> None:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

        self._executor.submit(close_checkpointer).result()
        self._executor.shutdown(wait=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
