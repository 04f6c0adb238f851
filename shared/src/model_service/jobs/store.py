"""Durable job store on one SQLite file in WAL mode.

Every change is one transaction that is on disk when the call returns, so a kill -9
of the service loses nothing that was acknowledged. Status changes go through
`transition`, which enforces the state machine. Every committed write of a job is
published to the store's change feed (`changes`: `model_service.jobs.feed`), which the
event bus, the webhooks and the graph coordinator follow; nobody publishes by hand.

Who uses what: the protocols below split the interface by its users (`JobReader`,
`JobWriter`, `RunQueue`, `GraphStore`, `RetentionStore`, `DeliveryStore`, `UploadStore`,
`SubmitStore`); `JobStore` is all of them.

Job graphs (long videos): a parent job and its children are written in one transaction;
`job_deps` holds which job waits for which, and `claim_next` takes only a child whose
dependencies all succeeded. Parents are never claimed: the graph coordinator
(`model_service.jobs.graph`) keeps their status.

Retention reads two indexes, a page at a time: `jobs_retention` (finished jobs whose
outputs are still on disk: `finished_before`) and `jobs_records` (finished top-level jobs:
`prune_finished` deletes whole graphs, a long video's parts with their parent).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic_core import from_json, to_json

from model_service.disk import disk_full, is_full
from model_service.errors import (
    IdempotencyConflict,
    InvalidTransition,
    NotFound,
    ServiceError,
    StoreBusy,
)
from model_service.jobs.feed import ChangeFeed, ChangeKind, before, kind_of
from model_service.jobs.record import REQUEST_FIELDS, STATE_FIELDS, Job
from model_service.jobs.status import TERMINAL, TRANSITIONS, JobStatus
from model_service.jobs.wal_sync import BACKSTOP_PAGES, WalSync
from model_service.logs import get_logger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS job_deps (
    job_id TEXT NOT NULL,
    depends_on TEXT NOT NULL,
    PRIMARY KEY (job_id, depends_on)
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS job_logs (
    job_id TEXT PRIMARY KEY,
    lines TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    content_type TEXT,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""


# Queued non-parent jobs whose dependencies all succeeded, oldest first (`claim_next`
# takes the first; `runnable` lists them)
log = get_logger("model_service.store")

_RUNNABLE = (
    "SELECT id, data, request FROM jobs AS j WHERE status = ? AND is_parent = 0 AND NOT EXISTS ("
    " SELECT 1 FROM job_deps AS d JOIN jobs AS dep ON dep.id = d.depends_on"
    " WHERE d.job_id = j.id AND dep.status != ?"
    ") ORDER BY seq LIMIT ?"
)
_RUNNABLE_PARAMS = (JobStatus.QUEUED.value, JobStatus.SUCCEEDED.value)

# Finished top-level jobs (a plain job, or a long video's parent) that finished before ?,
# none of whose parts is unfinished, oldest first: one page of `jobs_records` (INDEXED BY:
# the planner would otherwise take `jobs_status` and sort every finished job)
_PRUNABLE = (
    "SELECT id, is_parent, json_extract(data, '$.held_by') AS held_by FROM jobs AS j "
    "INDEXED BY jobs_records WHERE parent_id IS NULL AND finished_at < ? "
    "AND status IN (?, ?, ?) AND (is_parent = 0 OR NOT EXISTS ("
    " SELECT 1 FROM jobs AS c WHERE c.parent_id = j.id AND c.status NOT IN (?, ?, ?)"
    ")) ORDER BY finished_at LIMIT ?"
)
_TERMINAL_PARAMS = tuple(sorted(status.value for status in TERMINAL))

# How long a write waits for another process's lock on the file (a backup, the sqlite3
# CLI) before it fails with `store_busy`. Short: the store is called on the event loop.
BUSY_TIMEOUT_MS = 1000
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: int | None


@dataclass(frozen=True)
class Delivery:
    id: str
    job_id: str
    url: str
    event_type: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class Upload:
    id: str
    filename: str
    content_type: str | None
    size: int
    created_at: float


class JobReader(Protocol):
    """Reading jobs (the API, the submitter, every other user below), and following
    the writes (`changes`: `model_service.jobs.feed`)."""

    @property
    def changes(self) -> ChangeFeed: ...
    def find(self, job_id: str) -> Job | None: ...
    def get(self, job_id: str) -> Job: ...
    def page(self, status: JobStatus | None, limit: int, cursor: int | None) -> Page: ...
    def count(self, status: JobStatus) -> int: ...
    def children(self, parent_id: str) -> list[Job]: ...
    def job_log(self, job_id: str) -> list[str] | None:
        """The job's own log (model_service.job_logs), once stored; None: none stored."""


class JobWriter(JobReader, Protocol):
    """Creating and changing jobs (the API, the submitter, the runner). `change`
    callbacks may run more than once (on a fresh copy)."""

    def create(self, job: Job, durable: bool = True) -> tuple[Job, bool]: ...
    async def sync(self) -> None: ...
    def update(self, job_id: str, change: Callable[[Job], None], durable: bool = True) -> Job: ...
    def transition(
        self,
        job_id: str,
        target: JobStatus | Callable[[Job], JobStatus],
        change: Callable[[Job], None] | None = None,
        durable: bool = True,
    ) -> Job: ...


class RunQueue(JobWriter, Protocol):
    """The queue the runner and its job source take jobs from."""

    def claim_next(self, starts_now: bool = False) -> Job | None: ...
    def save_log(self, job_id: str, lines: list[str]) -> None:
        """The job's own log, once it ended (not synced: a log lost to a power cut is
        only a log)."""

    def runnable(self, limit: int = 1000) -> list[Job]: ...
    def running(self) -> list[Job]: ...


class GraphStore(JobWriter, Protocol):
    """Job graphs (long videos), for the graph coordinator."""

    def create_graph(self, parent: Job, children: list[Job]) -> tuple[Job, bool]: ...
    def add_children(
        self, parent_id: str, children: list[Job], change: Callable[[Job], None]
    ) -> Job: ...
    def remove_child(self, parent_id: str, child_id: str, change: Callable[[Job], None]) -> Job: ...
    def open_parents(self) -> list[Job]: ...


class RetentionStore(JobWriter, Protocol):
    """What retention reads and deletes (`model_service.retention`)."""

    def finished_before(
        self, cutoff: float, limit: int = 1000, after: tuple[float, str] | None = None
    ) -> list[Job]: ...
    def prune_finished(self, cutoff: float, limit: int = 500) -> list[tuple[str, str]]: ...
    def prune_uploads(self, cutoff: float, limit: int = 500) -> int: ...


class DeliveryStore(JobReader, Protocol):
    """Webhook deliveries (`model_service.webhooks`)."""

    def add_delivery(self, delivery: Delivery, due_at: float) -> None: ...
    def due_deliveries(self, now: float, limit: int = 20) -> list[Delivery]: ...
    def next_delivery_due(self) -> float | None: ...
    def record_attempt(
        self, delivery_id: str, *, state: str, next_attempt_at: float, error: str | None
    ) -> None: ...
    def deliveries(self, job_id: str) -> list[dict[str, Any]]: ...


class UploadStore(Protocol):
    """Uploaded files' records (POST /v1/uploads, and the submitter's look-up)."""

    def add_upload(self, upload: Upload) -> None: ...
    def get_upload(self, upload_id: str) -> Upload | None: ...


class SubmitStore(JobWriter, UploadStore, Protocol):
    """The submitter's: new jobs, and the uploads their input names."""


class JobStore(RunQueue, GraphStore, RetentionStore, DeliveryStore, UploadStore, Protocol):
    """Everything: `SqliteJobStore` (one machine) or
    `model_service.jobs.redis_store.RedisJobStore` (a fleet, QUEUE_URL), for the places
    that need it all (the API's state, start-up). Every method is one atomic change;
    every committed write of a job is published to `changes`."""

    def close(self) -> None: ...


def _job(row: sqlite3.Row) -> Job:
    """The job of a row: its state (`data`) and its request, stored apart."""
    request = row["request"]
    return Job.from_parts(from_json(row["data"]), from_json(request) if request else None)


def _parse(row: sqlite3.Row) -> Job | None:
    """The job a row holds, or None (logged once per job) when its JSON cannot be read:
    one damaged row must not make every list, the runner or retention fail."""
    try:
        return _job(row)
    except (ValueError, KeyError, TypeError) as exc:  # bad JSON, unknown status, fields
        if row["id"] not in _UNREADABLE:
            _UNREADABLE.add(row["id"])
            log.error("job row unreadable; left out", job_id=row["id"], error=repr(exc)[:300])
        return None


def _text(value: dict[str, Any]) -> str:
    """JSON text (pydantic's encoder: a few times faster than `json`)."""
    return to_json(value).decode()


def claim(job: Job, starts_now: bool) -> None:
    """A queued job taken to run: running, its attempt counted, and its start now if the
    engine begins it at once (else set when the engine begins it: it may wait first)."""
    job.status = JobStatus.RUNNING
    job.started_at = time.time() if starts_now else None
    job.attempts += 1
    job.progress_step = 0


def _readable(rows: list[sqlite3.Row]) -> list[Job]:
    return [job for row in rows if (job := _parse(row)) is not None]


_UNREADABLE: set[str] = set()


class SqliteJobStore:
    """Thread-safe; each method is one short transaction. Each committed write of a job
    is published to `changes` after the commit, outside the lock."""

    def __init__(self, path: Path) -> None:
        self.changes = ChangeFeed()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # checkpoints run in WalSync's thread; this is the backstop when no sync runs
        self._db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._wal_sync = WalSync(path)

    def _migrate(self) -> None:
        """Columns added since the first release (a store written by it opens as is)."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        with self._tx() as db:
            if "parent_id" not in columns:
                db.execute("ALTER TABLE jobs ADD COLUMN parent_id TEXT")
            if "is_parent" not in columns:
                db.execute("ALTER TABLE jobs ADD COLUMN is_parent INTEGER NOT NULL DEFAULT 0")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_parent ON jobs (parent_id)")
            if "finished_at" not in columns:  # retention reads these, not every job's JSON
                db.execute("ALTER TABLE jobs ADD COLUMN finished_at REAL")
                db.execute("ALTER TABLE jobs ADD COLUMN outputs_expired INTEGER NOT NULL DEFAULT 0")
                db.execute(
                    "UPDATE jobs SET finished_at = json_extract(data, '$.finished_at'), "
                    "outputs_expired = coalesce(json_extract(data, '$.outputs_expired'), 0)"
                )
            db.execute(
                "CREATE INDEX IF NOT EXISTS jobs_retention "
                "ON jobs (outputs_expired, finished_at, id)"
            )
            # record retention (`prune_finished`, `prune_uploads`): the candidates, and
            # what goes with a job, each found by an index (a big store's first open
            # builds them once: seconds for a million jobs)
            db.execute(
                "CREATE INDEX IF NOT EXISTS jobs_records ON jobs (finished_at) "
                "WHERE parent_id IS NULL"
            )
            db.execute("CREATE INDEX IF NOT EXISTS deliveries_job ON webhook_deliveries (job_id)")
            if "request" not in columns:  # the request apart from the state (`_save`)
                db.execute("ALTER TABLE jobs ADD COLUMN request TEXT")
                state = ", ".join("?" * len(STATE_FIELDS))
                request = ", ".join("?" * len(REQUEST_FIELDS))
                db.execute(  # placeholders only: the paths are parameters
                    f"UPDATE jobs SET request = json_remove(data, {state}), "  # noqa: S608
                    f"data = json_remove(data, {request})",
                    [f"$.{name}" for name in (*STATE_FIELDS, *REQUEST_FIELDS)],
                )
            db.execute("CREATE INDEX IF NOT EXISTS uploads_created ON uploads (created_at)")

    def close(self) -> None:
        self._wal_sync.close()
        with self._lock:
            self._db.close()

    async def sync(self) -> None:
        """Returns once every change made so far is on disk: the fsync of the changes
        written with `durable=False`, in a thread, shared by all that wait for it
        (`WalSync`, group commit)."""
        await self._wal_sync.sync()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """This process's lock on the connection; SQLite's busy and full errors as the
        service's `StoreBusy` and `DiskFull` (503, Retry-After)."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                error = _service_error(exc)
                if error is None:
                    raise
                raise error from exc

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. `durable=False` skips the fsync (WAL, synchronous=NORMAL): the
        change survives a crash of this process, and only a power loss or kernel crash
        can take it back. The runner's changes use it (claim, progress, the end of a
        run): losing one to a power loss leaves the job running in the store, so it runs
        again after the restart (its output files are not fsynced either). A new job
        and a client's cancel are always synced. The next synced commit syncs all."""
        with self._guard():
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # a failed COMMIT may leave it open
                        with suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    # --- jobs -----------------------------------------------------------------

    def create(self, job: Job, durable: bool = True) -> tuple[Job, bool]:
        """Insert a new job. If the id exists with the same request, return it and
        False (idempotent repeat); with a different request, raise a conflict.
        `durable=False`: not fsynced here; `await sync()` before telling anyone."""
        with self._tx(durable) as db:
            existing = self._get(db, job.id)
            if existing is not None:
                if existing.request_hash != job.request_hash:
                    raise IdempotencyConflict(
                        f"job {job.id} exists with a different request", job_id=job.id
                    )
                return existing, False
            self._insert(db, job)
        self.changes.publish(job, ChangeKind.STATUS)
        return job, True

    def create_graph(self, parent: Job, children: list[Job]) -> tuple[Job, bool]:
        """A parent and its children (with their `depends_on`) in one transaction;
        idempotent by the parent's id and request hash, like `create`."""
        with self._tx() as db:
            existing = self._get(db, parent.id)
            if existing is not None:
                if existing.request_hash != parent.request_hash:
                    raise IdempotencyConflict(
                        f"job {parent.id} exists with a different request", job_id=parent.id
                    )
                return existing, False
            self._insert(db, parent)
            for child in children:
                self._insert(db, child)
        self.changes.publish(parent, ChangeKind.STATUS)
        return parent, True

    def add_children(
        self, parent_id: str, children: list[Job], change: Callable[[Job], None]
    ) -> Job:
        """New children of an existing parent, and `change` to the parent, atomically."""
        with self._tx() as db:
            parent = self._require(db, parent_id)
            was = before(parent)
            change(parent)
            self._save(db, parent)
            for child in children:
                self._insert(db, child)
        self.changes.publish(parent, kind_of(was, parent))
        return parent

    def remove_child(self, parent_id: str, child_id: str, change: Callable[[Job], None]) -> Job:
        """Delete a child job (its row and dependencies) and apply `change` to the parent."""
        with self._tx() as db:
            parent = self._require(db, parent_id)
            was = before(parent)
            change(parent)
            self._save(db, parent)
            db.execute("DELETE FROM jobs WHERE id = ? AND parent_id = ?", (child_id, parent_id))
            db.execute(
                "DELETE FROM job_deps WHERE job_id = ? OR depends_on = ?", (child_id, child_id)
            )
        self.changes.publish(parent, kind_of(was, parent))
        return parent

    def children(self, parent_id: str) -> list[Job]:
        """A parent's children in the order they were created."""
        with self._guard():
            rows = self._db.execute(
                "SELECT id, data, request FROM jobs WHERE parent_id = ? ORDER BY seq", (parent_id,)
            ).fetchall()
        return _readable(rows)

    def open_parents(self) -> list[Job]:
        """Parents that are not finished (their children may need the coordinator)."""
        with self._guard():
            rows = self._db.execute(
                "SELECT id, data, request FROM jobs WHERE is_parent = 1 "
                "AND status NOT IN (?, ?, ?) ORDER BY seq",
                tuple(status.value for status in TERMINAL),
            ).fetchall()
        return _readable(rows)

    def _insert(self, db: sqlite3.Connection, job: Job) -> None:
        db.execute(
            "INSERT INTO jobs (id, status, created_at, data, request, parent_id, is_parent, "
            "finished_at, outputs_expired) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.status.value,
                job.created_at,
                _text(job.state_row()),
                _text(job.request_row()),
                job.parent_id,
                int(job.is_parent),
                job.finished_at,
                int(job.outputs_expired),
            ),
        )
        db.executemany(
            "INSERT OR IGNORE INTO job_deps (job_id, depends_on) VALUES (?, ?)",
            [(job.id, dep) for dep in job.depends_on],
        )

    def find(self, job_id: str) -> Job | None:
        with self._guard():
            return self._get(self._db, job_id)

    def get(self, job_id: str) -> Job:
        job = self.find(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}", job_id=job_id)
        return job

    def page(self, status: JobStatus | None, limit: int, cursor: int | None) -> Page:
        """Newest first. `cursor` is the `next_cursor` of the previous page."""
        query = "SELECT seq, id, data, request FROM jobs WHERE seq < ?"
        params: list[Any] = [cursor if cursor is not None else 2**62]
        if status is not None:
            query += " AND status = ?"
            params.append(status.value)
        query += " ORDER BY seq DESC LIMIT ?"
        params.append(limit + 1)
        with self._guard():
            rows = self._db.execute(query, params).fetchall()
        jobs = _readable(rows[:limit])
        next_cursor = rows[limit - 1]["seq"] if len(rows) > limit else None
        return Page(jobs, next_cursor)

    def count(self, status: JobStatus) -> int:
        with self._guard():
            row = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND is_parent = 0", (status.value,)
            ).fetchone()
        return int(row[0])

    def update(self, job_id: str, change: Callable[[Job], None], durable: bool = True) -> Job:
        """Apply `change` to the stored job (no status change) and save it."""
        with self._tx(durable) as db:
            job = self._require(db, job_id)
            was = before(job)
            change(job)
            self._save(db, job)
        self.changes.publish(job, kind_of(was, job))
        return job

    def transition(
        self,
        job_id: str,
        target: JobStatus | Callable[[Job], JobStatus],
        change: Callable[[Job], None] | None = None,
        durable: bool = True,
    ) -> Job:
        """Move a job to `target` if the state machine allows it from its status now
        (`target` may be chosen from the job as stored: one read, in the transaction)."""
        with self._tx(durable) as db:
            job = self._require(db, job_id)
            status = target(job) if callable(target) else target
            if status not in TRANSITIONS[job.status]:
                raise InvalidTransition(
                    f"job {job_id} cannot go from {job.status} to {status}", job_id=job_id
                )
            was = before(job)
            job.status = status
            if change is not None:
                change(job)
            self._save(db, job)
        self.changes.publish(job, kind_of(was, job))
        return job

    def claim_next(self, starts_now: bool = False) -> Job | None:
        """Oldest queued job whose dependencies all succeeded, moved to running (attempt
        counted), or None. `starts_now`: the engine begins it at once (it holds no other
        job), so its start is recorded here; else when the engine begins it. Not synced:
        after a power loss the job is simply queued again."""
        with self._guard():  # nothing to take (the usual answer): no write transaction
            if self._db.execute(_RUNNABLE, (*_RUNNABLE_PARAMS, 1)).fetchone() is None:
                return None
        with self._tx(durable=False) as db:
            while True:
                row = db.execute(_RUNNABLE, (*_RUNNABLE_PARAMS, 1)).fetchone()
                if row is None:
                    return None
                job = _parse(row)
                if job is not None:
                    break
                # an unreadable queued row would be taken again and again: out of the way
                db.execute(
                    "UPDATE jobs SET status = ? WHERE id = ?", (JobStatus.FAILED.value, row["id"])
                )
            claim(job, starts_now)
            self._save(db, job)
        self.changes.publish(job, ChangeKind.STATUS)
        return job

    def runnable(self, limit: int = 1000) -> list[Job]:
        """Queued non-parent jobs whose dependencies all succeeded, oldest first: what
        `claim_next` would take, in order."""
        with self._guard():
            rows = self._db.execute(_RUNNABLE, (*_RUNNABLE_PARAMS, limit)).fetchall()
        return _readable(rows)

    def running(self) -> list[Job]:
        """Jobs the runner is running (parents are not run by the runner)."""
        with self._guard():
            rows = self._db.execute(
                "SELECT id, data, request FROM jobs WHERE status = ? AND is_parent = 0 "
                "ORDER BY seq",
                (JobStatus.RUNNING.value,),
            ).fetchall()
        return _readable(rows)

    def finished_before(
        self, cutoff: float, limit: int = 1000, after: tuple[float, str] | None = None
    ) -> list[Job]:
        """Terminal jobs with outputs still on disk that finished before `cutoff`, oldest
        first, at most `limit`, after the (finished_at, id) `after` (the last of the page
        before): one page from the `jobs_retention` index, not every job's JSON."""
        query = (
            "SELECT id, data, request FROM jobs WHERE outputs_expired = 0 AND finished_at < ? "
            "AND status IN (?, ?, ?)"
        )
        params: list[Any] = [cutoff, *(status.value for status in TERMINAL)]
        if after is not None:
            query += " AND (finished_at, id) > (?, ?)"
            params += list(after)
        with self._guard():
            rows = self._db.execute(
                query + " ORDER BY finished_at, id LIMIT ?", (*params, limit)
            ).fetchall()
        return _readable(rows)

    def prune_finished(self, cutoff: float, limit: int = 500) -> list[tuple[str, str]]:
        """Delete up to `limit` finished job graphs whose top-level job finished before
        `cutoff`: the job, a long video's parts with their parent (a part is never deleted
        alone, nor a graph with a part still to finish), their `job_deps` and webhook
        deliveries, in one transaction. Returns each deleted job's (id, held_by), parts
        included; [] when nothing is left. Reads one page of `jobs_records` and those
        rows, never every job's JSON. Not synced: lost to a power cut, the next pass
        deletes them again. Publishes nothing (no job is left to tell of)."""
        with self._tx(durable=False) as db:
            rows = db.execute(
                _PRUNABLE, (cutoff, *_TERMINAL_PARAMS, *_TERMINAL_PARAMS, limit)
            ).fetchall()
            found = [(row["id"], row["held_by"] or "") for row in rows]
            for parent_id in [row["id"] for row in rows if row["is_parent"]]:
                found += [
                    (row["id"], row["held_by"] or "")
                    for row in db.execute(
                        "SELECT id, json_extract(data, '$.held_by') AS held_by FROM jobs "
                        "WHERE parent_id = ?",
                        (parent_id,),
                    )
                ]
            ids = [(job_id,) for job_id, _ in found]
            db.executemany("DELETE FROM jobs WHERE id = ?", ids)
            # dependencies are between the parts of one graph: by job_id (its primary key)
            db.executemany("DELETE FROM job_deps WHERE job_id = ?", ids)
            db.executemany("DELETE FROM webhook_deliveries WHERE job_id = ?", ids)
            db.executemany("DELETE FROM job_logs WHERE job_id = ?", ids)
            return found

    def save_log(self, job_id: str, lines: list[str]) -> None:
        with self._tx(durable=False) as db:
            db.execute(  # only while the job exists (not one deleted meanwhile)
                "INSERT OR REPLACE INTO job_logs (job_id, lines) "
                "SELECT ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?)",
                (job_id, to_json(lines).decode(), job_id),
            )

    def job_log(self, job_id: str) -> list[str] | None:
        with self._guard():
            row = self._db.execute(
                "SELECT lines FROM job_logs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else list(from_json(row["lines"]))

    def prune_uploads(self, cutoff: float, limit: int = 500) -> int:
        """Delete up to `limit` upload records made before `cutoff`; returns how many."""
        with self._tx(durable=False) as db:
            return db.execute(
                "DELETE FROM uploads WHERE id IN "
                "(SELECT id FROM uploads WHERE created_at < ? LIMIT ?)",
                (cutoff, limit),
            ).rowcount

    def _get(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT data, request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def _require(self, db: sqlite3.Connection, job_id: str) -> Job:
        job = self._get(db, job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}", job_id=job_id)
        return job

    def _save(self, db: sqlite3.Connection, job: Job) -> None:
        """The job's state; its request, written by `_insert`, never changes."""
        db.execute(
            "UPDATE jobs SET status = ?, data = ?, finished_at = ?, outputs_expired = ? "
            "WHERE id = ?",
            (
                job.status.value,
                _text(job.state_row()),
                job.finished_at,
                int(job.outputs_expired),
                job.id,
            ),
        )

    # --- webhook deliveries ------------------------------------------------------

    def add_delivery(self, delivery: Delivery, due_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO webhook_deliveries "
                "(id, job_id, url, event_type, payload, next_attempt_at) VALUES (?,?,?,?,?,?)",
                (
                    delivery.id,
                    delivery.job_id,
                    delivery.url,
                    delivery.event_type,
                    delivery.payload,
                    due_at,
                ),
            )

    def due_deliveries(self, now: float, limit: int = 20) -> list[Delivery]:
        with self._guard():
            rows = self._db.execute(
                "SELECT id, job_id, url, event_type, payload, attempts FROM webhook_deliveries "
                "WHERE state = 'pending' AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [Delivery(**dict(row)) for row in rows]

    def next_delivery_due(self) -> float | None:
        with self._guard():
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'"
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def record_attempt(
        self, delivery_id: str, *, state: str, next_attempt_at: float, error: str | None
    ) -> None:
        """`state`: pending (retry at next_attempt_at), delivered or failed (gave up)."""
        with self._tx() as db:
            db.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, state = ?, "
                "next_attempt_at = ?, last_error = ? WHERE id = ?",
                (state, next_attempt_at, error, delivery_id),
            )

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        with self._guard():
            rows = self._db.execute(
                "SELECT id, event_type, attempts, state, last_error FROM webhook_deliveries "
                "WHERE job_id = ? ORDER BY rowid",
                (job_id,),
            ).fetchall()
        return [dict(row) for row in rows]

    # --- uploads -------------------------------------------------------------------

    def add_upload(self, upload: Upload) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO uploads (id, filename, content_type, size, created_at) "
                "VALUES (?,?,?,?,?)",
                (upload.id, upload.filename, upload.content_type, upload.size, upload.created_at),
            )

    def get_upload(self, upload_id: str) -> Upload | None:
        with self._guard():
            row = self._db.execute(
                "SELECT id, filename, content_type, size, created_at FROM uploads WHERE id = ?",
                (upload_id,),
            ).fetchone()
        return None if row is None else Upload(**dict(row))


def _service_error(exc: sqlite3.Error) -> ServiceError | None:
    """Busy/locked and full as the service's errors; None for anything else (a bug or a
    broken file: raised as it is)."""
    if is_full(exc):
        return disk_full("the job store could not be written")
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreBusy(
            "the job store (DATA_DIR/jobs.sqlite3) is locked by another process (a backup, "
            "the sqlite3 CLI); nothing was changed. Retry shortly; if it persists, find "
            "the process that holds the lock",
            retry_after_s=RETRY_AFTER_S,
        )
    return None
