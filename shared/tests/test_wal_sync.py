"""Group commit (`model_service.jobs.wal_sync`): the WAL's fsync off the event loop,
shared by every commit made before it began."""

import asyncio
import errno
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from model_service.errors import ServiceError
from model_service.jobs import wal_sync
from model_service.jobs.wal_sync import WalSync


def _database(tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE t (x INTEGER)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the table in the main file
    return path, db


def test_syncs_share_one_fsync_and_wait_for_one_that_began_after_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, db = _database(tmp_path)
    calls: list[tuple[float, float, int]] = []  # (began, ended, rows on disk then)
    real_fsync = os.fsync
    loop_thread = threading.get_ident()

    def slow_fsync(fd: int) -> None:
        assert threading.get_ident() != loop_thread  # never on the event loop
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # the folder's, once
            real_fsync(fd)
            return
        began = time.monotonic()
        rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM t").fetchone()[0]
        time.sleep(0.2)
        real_fsync(fd)
        calls.append((began, time.monotonic(), rows))

    monkeypatch.setattr(wal_sync.os, "fsync", slow_fsync)
    sync = WalSync(path)

    async def commit_then_sync(value: int) -> float:
        db.execute("INSERT INTO t VALUES (?)", (value,))
        await sync.sync()
        return time.monotonic()

    async def scenario() -> tuple[float, list[float], float]:
        first = asyncio.ensure_future(commit_then_sync(1))
        await asyncio.sleep(0.05)  # the first fsync is under way
        loop_free_at = time.monotonic()
        others = [asyncio.ensure_future(commit_then_sync(i)) for i in range(2, 6)]
        await asyncio.sleep(0)
        loop_free = time.monotonic() - loop_free_at  # the loop was never blocked
        return await first, list(await asyncio.gather(*others)), loop_free

    first_done, others_done, loop_free = asyncio.run(scenario())
    sync.close()
    # one fsync for the first, ONE more for the four that committed during it
    file_syncs = calls
    assert [rows for *_, rows in file_syncs] == [1, 5]
    assert all(done >= file_syncs[1][1] for done in others_done)  # not the first's
    assert first_done >= file_syncs[0][1]
    assert loop_free < 0.05


def test_a_sync_with_nothing_before_it_returns_and_close_is_clean(tmp_path: Path) -> None:
    path, db = _database(tmp_path)
    sync = WalSync(path)

    async def twice() -> None:
        db.execute("INSERT INTO t VALUES (1)")
        await sync.sync()
        await sync.sync()

    asyncio.run(twice())
    sync.close()
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1


def test_checkpoints_run_in_the_sync_thread(tmp_path: Path) -> None:
    path, db = _database(tmp_path)
    db.execute("PRAGMA wal_autocheckpoint=0")  # only WalSync copies the WAL back

    def rows_in_the_database_file() -> int:
        """The rows the main file holds by itself (a copy without its WAL)."""
        copy = tmp_path / "copy.sqlite3"
        copy.write_bytes(path.read_bytes())
        return int(sqlite3.connect(copy).execute("SELECT COUNT(*) FROM t").fetchone()[0])

    for i in range(50):
        db.execute("INSERT INTO t VALUES (?)", (i,))
    assert rows_in_the_database_file() == 0  # all in the WAL so far
    sync = WalSync(path)
    asyncio.run(sync.sync())
    sync.close()
    assert rows_in_the_database_file() == 50


def test_a_full_disk_is_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, db = _database(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_sync.os, "fsync", full)
    sync = WalSync(path)
    db.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ServiceError) as caught:
        asyncio.run(sync.sync())
    sync.close()
    assert caught.value.code == "disk_full"
