"""The job store on Redis: what every pod of a fleet shares when QUEUE_URL is redis://.

Same interface (`JobStore`) and semantics as `SqliteJobStore` (`jobs/store.py`), for many
processes at once. Keys, all under the namespace `N` given by the caller (`ms:<service>`):

    N:seq                   counter: each job gets the next number ("seq": order, cursor)
    N:job:<id>              hash: data (the job as JSON), status, seq, parent, is_parent
                            (parent and is_parent as inserted, like SQLite's columns)
    N:jobs                  sorted set of every job id by seq (`page` with no filter)
    N:status:<status>       sorted set of the job ids in that status by seq (parents too)
    N:work:<status>         the same without parents (`count`, `running`, `claim_next`)
    N:open_parents          sorted set of the parents that are not finished, by seq
    N:children:<id>         sorted set of the jobs whose parent is <id>, by seq
    N:deps:<id>             set of the jobs <id> waits for; N:waiters:<id> the reverse
    N:delivery:<id>         a webhook delivery as JSON
    N:deliveries:due        sorted set of pending delivery ids by next attempt time
    N:deliveries:job:<id>   list of a job's delivery ids in the order they were added
    N:upload:<id>           an upload's record as JSON
    N:finished              sorted set of the finished jobs whose outputs are not expired,
                            by finished_at (`finished_before`)
    N:records               sorted set of the finished top-level jobs (no parent_id), by
                            finished_at (`prune_finished`: a graph goes with its parent)
    N:uploads               sorted set of the upload ids by created_at (`prune_uploads`)
    N:indexed               marker: the three sets above hold the records written before
                            they existed (built once by the first retention pass)

Retention's indexes: a job is in N:finished and N:records exactly while its record says
so (`_retention_index`, in the transaction that writes the status, `outputs_expired` or
`finished_at`), so a pass reads one page of ids by score and then only those jobs; the
jobs it reads are checked again (an entry and a record read in two steps). Two sets,
not one: outputs expire long before records, and an expired job must leave the first
without leaving the second. All pods must run this version: an older pod's writes would
not update them.

Atomicity: every change is one MULTI/EXEC under WATCH of the keys it read (retried on a
conflict, so a `change` callback may run more than once, each time on a freshly read
job); the record and its indexes change in the same transaction. Which queued job is
runnable is found by a read-only Lua script (one consistent look at the queue and the
dependencies; it names keys itself, so this is for a single Redis, not Redis Cluster);
the claim then re-checks it under WATCH. Reads that take ids from an index and then the
records (`page`, `children`, `running`, ...) are two steps: a job removed in between is
left out, one changed in between is returned as it is now.

Changes: every committed write of a job is published to `changes` (the change feed,
`model_service.jobs.feed`) once its EXEC succeeded, with the job as that (last) try
wrote it; a try that lost to a conflict publishes nothing. Other pods' writes reach
this pod's listeners through the event bus's pub/sub (`model_service.fleet.events`).

Durability: an acknowledged write is as durable as the Redis server's appendonly/fsync
configuration makes it (`appendfsync always` for no loss; `everysec` may lose the last
second on a power loss). `durable=False` is accepted and changes nothing here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ParamSpec, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry

from model_service.errors import (
    IdempotencyConflict,
    InvalidTransition,
    NotFound,
    StoreUnavailable,
)
from model_service.jobs.feed import Before, ChangeFeed, ChangeKind, before, kind_of
from model_service.jobs.record import Job
from model_service.jobs.status import TERMINAL, TRANSITIONS, JobStatus
from model_service.jobs.store import Delivery, Page, Upload, claim

P = ParamSpec("P")
T = TypeVar("T")

_TERMINAL_VALUES = frozenset(status.value for status in TERMINAL)
# HSET KEYS[1] ARGV[1] ARGV[2], unless the hash is gone (a job deleted meanwhile)
_SET_IF_EXISTS = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end"
)

# The queued non-parent jobs whose dependencies all succeeded (a dependency that is not
# stored does not hold a job back, as in SQLite), oldest first: their JSON, at most
# ARGV[2]. KEYS[1] is N:work:queued, ARGV[1] the prefix "N:".
_RUNNABLE = """
local prefix, limit = ARGV[1], tonumber(ARGV[2])
local found, offset = {}, 0
while #found < limit do
  local ids = redis.call('ZRANGE', KEYS[1], offset, offset + 99)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local ready = true
    for _, dep in ipairs(redis.call('SMEMBERS', prefix .. 'deps:' .. id)) do
      local status = redis.call('HGET', prefix .. 'job:' .. dep, 'status')
      if status and status ~= 'succeeded' then
        ready = false
        break
      end
    end
    if ready then
      found[#found + 1] = redis.call('HMGET', prefix .. 'job:' .. id, 'data', 'request')
      if #found >= limit then break end
    end
  end
  offset = offset + 100
end
return found
"""


def unreachable(exc: Exception) -> StoreUnavailable:
    """The error for a Redis (QUEUE_URL) that cannot be reached."""
    return StoreUnavailable(
        f"the job store (Redis at QUEUE_URL) cannot be reached: {exc}. Check that "
        "Redis is up and QUEUE_URL points at it; try again in a few seconds",
        retry_after_s=5,
    )


def _guard(method: Callable[P, T]) -> Callable[P, T]:
    """Redis unreachable (refused, dropped, timed out) -> StoreUnavailable."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise unreachable(exc) from exc

    return guarded


def _job(data: str, request: str | None) -> Job:
    """A job from its hash: the state (`data`) and the request, kept apart so that a
    change writes the small state alone (an older store's `data` holds both)."""
    return Job.from_parts(json.loads(data), json.loads(request) if request else None)


@dataclass
class _Stored:
    """A job as read, with the index fields its record holds."""

    job: Job
    status: str
    seq: int
    parent: str
    is_parent: bool
    whole: bool = False  # its hash holds the request inside `data` (an older store)


class RedisJobStore:
    """Thread-safe and multi-process-safe; each method is one atomic step."""

    DELIVERY_LEASE_S = 120.0

    def __init__(self, url: str, namespace: str) -> None:
        self.changes = ChangeFeed()
        self._prefix = f"{namespace}:"
        self._indexed = False  # N:indexed seen (`_ensure_indexes`)
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=5,
            health_check_interval=30,
            # one immediate reconnect after a dropped connection; none after a timeout
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        )
        self._runnable_script = self._redis.register_script(_RUNNABLE)

    def close(self) -> None:
        self._redis.close()

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _atomic(self, keys: list[str], body: Callable[[Pipeline], T]) -> T:
        """Run `body` with `keys` watched; what it queued after `pipe.multi()` is applied
        if nothing it watched changed, else it runs again."""
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(*keys)  # type: ignore[no-untyped-call]
                    result = body(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                except redis.WatchError:
                    continue
                return result

    # --- jobs -----------------------------------------------------------------

    @_guard
    def create(self, job: Job, durable: bool = True) -> tuple[Job, bool]:
        """Insert a new job. If the id exists with the same request, return it and
        False (idempotent repeat); with a different request, raise a conflict.
        (`durable`: Redis's own persistence settings decide, as for every write.)"""
        return self.create_graph(job, [])

    async def sync(self) -> None:
        """Nothing to wait for: a write is as durable as Redis's persistence makes it
        when it returns."""

    @_guard
    def create_graph(self, parent: Job, children: list[Job]) -> tuple[Job, bool]:
        """A parent and its children (with their `depends_on`) in one transaction;
        idempotent by the parent's id and request hash, like `create`."""

        def body(pipe: Pipeline) -> tuple[Job, bool]:
            existing = self._load(pipe, parent.id)
            if existing is not None:
                if existing.job.request_hash != parent.request_hash:
                    raise IdempotencyConflict(
                        f"job {parent.id} exists with a different request", job_id=parent.id
                    )
                return existing.job, False
            self._check_new(pipe, children)
            first_seq = self._reserve_seqs(1 + len(children))
            pipe.multi()
            self._insert(pipe, [parent, *children], first_seq)
            return parent, True

        keys = [self._key("job", job.id) for job in [parent, *children]]
        job, created = self._atomic(keys, body)
        if created:
            self.changes.publish(job, ChangeKind.STATUS)
        return job, created

    @_guard
    def add_children(
        self, parent_id: str, children: list[Job], change: Callable[[Job], None]
    ) -> Job:
        """New children of an existing parent, and `change` to the parent, atomically."""

        def body(pipe: Pipeline) -> tuple[Job, Before]:
            stored = self._require(pipe, parent_id)
            self._check_new(pipe, children)
            was = before(stored.job)
            change(stored.job)
            first_seq = self._reserve_seqs(len(children))
            pipe.multi()
            self._save(pipe, stored)
            self._insert(pipe, children, first_seq)
            return stored.job, was

        keys = [self._key("job", job_id) for job_id in [parent_id, *(c.id for c in children)]]
        return self._published(*self._atomic(keys, body))

    @_guard
    def remove_child(self, parent_id: str, child_id: str, change: Callable[[Job], None]) -> Job:
        """Delete a child job (its record and dependencies) and apply `change` to the
        parent."""
        deps_key, waiters_key = self._key("deps", child_id), self._key("waiters", child_id)

        def body(pipe: Pipeline) -> tuple[Job, Before]:
            stored = self._require(pipe, parent_id)
            child = self._load(pipe, child_id)
            deps = cast("set[str]", pipe.smembers(deps_key))
            waiters = cast("set[str]", pipe.smembers(waiters_key))
            was = before(stored.job)
            change(stored.job)
            pipe.multi()
            self._save(pipe, stored)
            if child is not None and child.parent == parent_id:
                self._delete(pipe, child)
            for dep in deps:
                pipe.srem(self._key("waiters", dep), child_id)
            for waiter in waiters:
                pipe.srem(self._key("deps", waiter), child_id)
            pipe.delete(deps_key, waiters_key)
            return stored.job, was

        keys = [self._key("job", parent_id), self._key("job", child_id), deps_key, waiters_key]
        return self._published(*self._atomic(keys, body))

    @_guard
    def children(self, parent_id: str) -> list[Job]:
        """A parent's children in the order they were created."""
        return self._jobs(self._zrange(self._key("children", parent_id)))

    @_guard
    def open_parents(self) -> list[Job]:
        """Parents that are not finished (their children may need the coordinator)."""
        return self._jobs(self._zrange(self._key("open_parents")))

    @_guard
    def find(self, job_id: str) -> Job | None:
        data, request = cast(
            "list[str | None]", self._redis.hmget(self._key("job", job_id), ["data", "request"])
        )
        return None if data is None else _job(data, request)

    def get(self, job_id: str) -> Job:
        job = self.find(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}", job_id=job_id)
        return job

    @_guard
    def save_log(self, job_id: str, lines: list[str]) -> None:
        """In the job's hash (deleted with it), only while the job exists."""
        self._redis.eval(_SET_IF_EXISTS, 1, self._key("job", job_id), "log", json.dumps(lines))

    @_guard
    def job_log(self, job_id: str) -> list[str] | None:
        raw = cast("str | None", self._redis.hget(self._key("job", job_id), "log"))
        return None if raw is None else list(json.loads(raw))

    @_guard
    def page(self, status: JobStatus | None, limit: int, cursor: int | None) -> Page:
        """Newest first. `cursor` is the `next_cursor` of the previous page."""
        key = self._key("jobs") if status is None else self._key("status", status.value)
        rows = cast(
            "list[tuple[str, float]]",
            self._redis.zrevrangebyscore(
                key,
                "+inf" if cursor is None else f"({cursor}",
                "-inf",
                start=0,
                num=limit + 1,
                withscores=True,
            ),
        )
        jobs = self._jobs([job_id for job_id, _ in rows[:limit]])
        next_cursor = int(rows[limit - 1][1]) if len(rows) > limit else None
        return Page(jobs, next_cursor)

    @_guard
    def count(self, status: JobStatus) -> int:
        return int(cast("int", self._redis.zcard(self._key("work", status.value))))

    @_guard
    def update(self, job_id: str, change: Callable[[Job], None], durable: bool = True) -> Job:
        """Apply `change` to the stored job and save it (a status it sets is indexed)."""

        def body(pipe: Pipeline) -> tuple[Job, Before]:
            stored = self._require(pipe, job_id)
            was = before(stored.job)
            change(stored.job)
            pipe.multi()
            self._save(pipe, stored)
            return stored.job, was

        return self._published(*self._atomic([self._key("job", job_id)], body))

    @_guard
    def transition(
        self,
        job_id: str,
        target: JobStatus | Callable[[Job], JobStatus],
        change: Callable[[Job], None] | None = None,
        durable: bool = True,
    ) -> Job:
        """Move a job to `target` if the state machine allows it from its status now
        (`target` may be chosen from the job as stored: one read, in the transaction)."""

        def body(pipe: Pipeline) -> tuple[Job, Before]:
            stored = self._require(pipe, job_id)
            job = stored.job
            status = target(job) if callable(target) else target
            if status not in TRANSITIONS[job.status]:
                raise InvalidTransition(
                    f"job {job_id} cannot go from {job.status} to {status}", job_id=job_id
                )
            was = before(job)
            job.status = status
            if change is not None:
                change(job)
            pipe.multi()
            self._save(pipe, stored)
            return job, was

        return self._published(*self._atomic([self._key("job", job_id)], body))

    def _published(self, job: Job, was: Before) -> Job:
        """`job` as a committed write left it, published to `changes`."""
        self.changes.publish(job, kind_of(was, job))
        return job

    @_guard
    def runnable(self, limit: int = 1000) -> list[Job]:
        """Queued non-parent jobs whose dependencies all succeeded, oldest first: what
        `claim_next` would take, in order."""
        found = self._runnable_script(
            keys=[self._key("work", "queued")], args=[self._prefix, limit]
        )
        return [_job(data, request) for data, request in cast("list[list[str]]", found)]

    @_guard
    def claim_next(self, starts_now: bool = False) -> Job | None:
        """Oldest queued job whose dependencies all succeeded, moved to running (attempt
        counted), or None. Two processes never claim the same job. `starts_now`: the
        engine begins it at once, so its start is recorded here (`store.claim`)."""
        while True:
            found = self.runnable(1)
            if not found:
                return None
            claimed = self._claim(found[0].id, starts_now)
            if claimed is not None:
                self.changes.publish(claimed, ChangeKind.STATUS)
                return claimed
            # taken or changed by another process since the look: look again

    def _claim(self, job_id: str, starts_now: bool) -> Job | None:
        deps_key = self._key("deps", job_id)

        def body(pipe: Pipeline) -> Job | None:
            deps = cast("set[str]", pipe.smembers(deps_key))
            if deps:
                pipe.watch(*(self._key("job", dep) for dep in deps))  # type: ignore[no-untyped-call]
            stored = self._load(pipe, job_id)
            if stored is None or stored.is_parent or stored.status != JobStatus.QUEUED.value:
                return None
            for dep in deps:
                status = cast("str | None", pipe.hget(self._key("job", dep), "status"))
                if status is not None and status != JobStatus.SUCCEEDED.value:
                    return None
            job = stored.job
            claim(job, starts_now)
            pipe.multi()
            self._save(pipe, stored)
            return job

        return self._atomic([self._key("job", job_id), deps_key], body)

    @_guard
    def running(self) -> list[Job]:
        """Jobs the runner is running (parents are not run by the runner)."""
        return self._jobs(self._zrange(self._key("work", JobStatus.RUNNING.value)))

    @_guard
    def finished_before(
        self, cutoff: float, limit: int = 1000, after: tuple[float, str] | None = None
    ) -> list[Job]:
        """Terminal jobs with outputs still on disk that finished before `cutoff`, oldest
        first, at most `limit`, after the (finished_at, id) `after`: one page of ids from
        N:finished (a sorted set orders equal scores by id, as SQLite's index), then
        those jobs."""
        self._ensure_indexes()
        low: float | str = "-inf" if after is None else after[0]  # ties: filtered by id
        found: list[Job] = []
        offset = 0
        while len(found) < limit:  # more than one round only past ties and stale entries
            want = limit - len(found)
            rows = cast(
                "list[tuple[str, float]]",
                self._redis.zrangebyscore(
                    self._key("finished"),
                    low,
                    f"({cutoff!r}",
                    start=offset,
                    num=want,
                    withscores=True,
                ),
            )
            offset += len(rows)
            ids = [job_id for job_id, score in rows if after is None or (score, job_id) > after]
            found += [
                job
                for job in self._jobs(ids)
                if job.status.value in _TERMINAL_VALUES
                and not job.outputs_expired
                and job.finished_at is not None
                and job.finished_at < cutoff
                and (after is None or (job.finished_at, job.id) > after)
            ]
            if len(rows) < want:
                break
        found.sort(key=lambda job: (job.finished_at or 0.0, job.id))  # changed meanwhile
        return found[:limit]

    @_guard
    def prune_finished(self, cutoff: float, limit: int = 500) -> list[tuple[str, str]]:
        """Delete up to `limit` finished job graphs whose top-level job finished before
        `cutoff`: the job, a long video's parts with their parent (a part is never deleted
        alone, nor a graph with a part still to finish), their dependencies and webhook
        deliveries, each graph in one transaction. Returns each deleted job's (id,
        held_by), parts included; [] when nothing is left. Reads ids from N:records by
        score, then only those graphs."""
        self._ensure_indexes()
        pruned: list[tuple[str, str]] = []
        graphs = skipped = 0
        while graphs < limit:
            ids = cast(
                "list[str]",
                self._redis.zrangebyscore(
                    self._key("records"), "-inf", f"({cutoff!r}", start=skipped, num=limit
                ),
            )
            if not ids:
                break
            for job_id in ids[: limit - graphs]:
                deleted = self._prune_graph(job_id, cutoff)
                if deleted is None:
                    skipped += 1  # left in the set: a part still runs
                elif deleted:
                    pruned += deleted
                    graphs += 1
        return pruned

    def _prune_graph(self, job_id: str, cutoff: float) -> list[tuple[str, str]] | None:
        """Delete one graph (as `prune_finished`): its jobs' (id, held_by); [] when it is
        gone already; None when it may not go (yet)."""
        children_key = self._key("children", job_id)

        def body(pipe: Pipeline) -> list[tuple[str, str]] | None:
            top = self._load(pipe, job_id)
            if top is None:  # deleted by another pod meanwhile
                pipe.multi()
                pipe.zrem(self._key("records"), job_id)
                return []
            child_ids = cast("list[str]", pipe.zrange(children_key, 0, -1))
            lists = [self._key("deliveries", "job", i) for i in [job_id, *child_ids]]
            pipe.watch(*(self._key("job", i) for i in child_ids), *lists)  # type: ignore[no-untyped-call]
            children = [self._load(pipe, child_id) for child_id in child_ids]
            graph = [top, *(child for child in children if child is not None)]
            if (
                top.parent
                or top.job.finished_at is None
                or top.job.finished_at >= cutoff
                or any(stored.status not in _TERMINAL_VALUES for stored in graph)
            ):
                return None
            deliveries = [cast("list[str]", pipe.lrange(key, 0, -1)) for key in lists]
            pipe.multi()
            for stored in graph:
                self._delete(pipe, stored)
                # dependencies are between the parts of one graph: both ends go here
                pipe.delete(self._key("deps", stored.job.id), self._key("waiters", stored.job.id))
            for delivery_ids in deliveries:
                if delivery_ids:
                    pipe.delete(*(self._key("delivery", i) for i in delivery_ids))
                    pipe.zrem(self._key("deliveries", "due"), *delivery_ids)
            pipe.delete(children_key, *lists)
            return [(stored.job.id, stored.job.held_by) for stored in graph]

        return self._atomic([self._key("job", job_id), children_key], body)

    @_guard
    def prune_uploads(self, cutoff: float, limit: int = 500) -> int:
        """Delete up to `limit` upload records made before `cutoff`; returns how many."""
        self._ensure_indexes()
        key = self._key("uploads")
        ids = cast(
            "list[str]",
            self._redis.zrangebyscore(key, "-inf", f"({cutoff!r}", start=0, num=limit),
        )
        if ids:
            with self._redis.pipeline() as pipe:  # MULTI: the record and its entry at once
                pipe.delete(*(self._key("upload", i) for i in ids))
                pipe.zrem(key, *ids)
                pipe.execute()
        return len(ids)

    # --- retention indexes --------------------------------------------------------

    def _ensure_indexes(self) -> None:
        """Build N:finished, N:records and N:uploads from the stored records once, when
        N:indexed is missing (a store written before they existed). Each batch is read
        and indexed under WATCH, so a job changed meanwhile is indexed as it is now; two
        pods building at once write the same entries."""
        if self._indexed:
            return
        marker = self._key("indexed")
        if not self._redis.exists(marker):
            last = "-inf"
            while rows := cast(
                "list[tuple[str, float]]",
                self._redis.zrangebyscore(
                    self._key("jobs"), last, "+inf", start=0, num=500, withscores=True
                ),
            ):
                self._index_batch([job_id for job_id, _ in rows])
                last = f"({rows[-1][1]!r}"
            for keys in _batches(self._redis.scan_iter(self._key("upload", "*"), count=500)):
                records = cast("list[str | None]", self._redis.mget(keys))
                uploads = {
                    upload["id"]: upload["created_at"]
                    for upload in (json.loads(r) for r in records if r is not None)
                }
                if uploads:
                    self._redis.zadd(self._key("uploads"), uploads)
            self._redis.set(marker, 1)
        self._indexed = True

    def _index_batch(self, job_ids: list[str]) -> None:
        def body(pipe: Pipeline) -> None:
            # one round trip for the batch, on another connection: read after the WATCH,
            # so a job changed since makes the EXEC fail and this run again
            reader = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                reader.hmget(self._key("job", job_id), ["data", "request"])
            rows = reader.execute()
            pipe.multi()
            for data, request in rows:
                if data is not None:
                    self._retention_index(pipe, _job(data, request))

        self._atomic([self._key("job", job_id) for job_id in job_ids], body)

    def _retention_index(self, pipe: Pipeline, job: Job) -> None:
        """Queue the job's entries in N:finished and N:records as its record now says."""
        finished = job.finished_at if job.status.value in _TERMINAL_VALUES else None
        for key, member in (
            ("finished", finished is not None and not job.outputs_expired),
            ("records", finished is not None and not job.parent_id),
        ):
            if member:
                pipe.zadd(self._key(key), {job.id: cast("float", finished)})
            else:
                pipe.zrem(self._key(key), job.id)

    # --- job records ------------------------------------------------------------

    def _load(self, pipe: Pipeline, job_id: str) -> _Stored | None:
        data, request, status, seq, parent, is_parent = cast(
            "list[str | None]",
            pipe.hmget(
                self._key("job", job_id),
                ["data", "request", "status", "seq", "parent", "is_parent"],
            ),
        )
        if data is None:
            return None
        return _Stored(
            _job(data, request),
            str(status),
            int(seq or 0),
            parent or "",
            is_parent == "1",
            whole=request is None,
        )

    def _require(self, pipe: Pipeline, job_id: str) -> _Stored:
        stored = self._load(pipe, job_id)
        if stored is None:
            raise NotFound(f"no job with id {job_id!r}", job_id=job_id)
        return stored

    def _check_new(self, pipe: Pipeline, jobs: list[Job]) -> None:
        """New jobs' ids must be free (SQLite refuses them by its unique id)."""
        ids = [job.id for job in jobs]
        taken = [job_id for job_id in ids if cast("int", pipe.exists(self._key("job", job_id)))]
        if taken or len(set(ids)) != len(ids):
            job_id = taken[0] if taken else ids[0]
            raise IdempotencyConflict(f"job {job_id} exists already", job_id=job_id)

    def _reserve_seqs(self, count: int) -> int:
        """The first of `count` new sequence numbers (one left unused by a transaction
        that is retried is only a gap)."""
        last = int(cast("int", self._redis.incrby(self._key("seq"), count)))
        return last - count + 1

    def _insert(self, pipe: Pipeline, jobs: list[Job], first_seq: int) -> None:
        """Queue the writes of new jobs and their index entries (after `pipe.multi()`)."""
        for seq, job in enumerate(jobs, start=first_seq):
            status = job.status.value
            pipe.hset(
                self._key("job", job.id),
                mapping={
                    "data": json.dumps(job.state_row()),
                    "request": json.dumps(job.request_row()),
                    "status": status,
                    "seq": seq,
                    "parent": job.parent_id or "",
                    "is_parent": int(job.is_parent),
                },
            )
            pipe.zadd(self._key("jobs"), {job.id: seq})
            pipe.zadd(self._key("status", status), {job.id: seq})
            if not job.is_parent:
                pipe.zadd(self._key("work", status), {job.id: seq})
            elif status not in _TERMINAL_VALUES:
                pipe.zadd(self._key("open_parents"), {job.id: seq})
            if job.parent_id:
                pipe.zadd(self._key("children", job.parent_id), {job.id: seq})
            if status in _TERMINAL_VALUES:
                self._retention_index(pipe, job)
            for dep in job.depends_on:
                pipe.sadd(self._key("deps", job.id), dep)
                pipe.sadd(self._key("waiters", dep), job.id)

    def _save(self, pipe: Pipeline, stored: _Stored) -> None:
        """Queue the write of a changed job and its move between status indexes."""
        job, old, new = stored.job, stored.status, stored.job.status.value
        record = {"data": json.dumps(job.state_row()), "status": new}
        if stored.whole:  # written before the request was kept apart: split it now
            record["request"] = json.dumps(job.request_row())
        pipe.hset(self._key("job", job.id), mapping=record)
        if old in _TERMINAL_VALUES or new in _TERMINAL_VALUES:  # else in neither set
            self._retention_index(pipe, job)
        if old == new:
            return
        pipe.zrem(self._key("status", old), job.id)
        pipe.zadd(self._key("status", new), {job.id: stored.seq})
        if not stored.is_parent:
            pipe.zrem(self._key("work", old), job.id)
            pipe.zadd(self._key("work", new), {job.id: stored.seq})
        elif new in _TERMINAL_VALUES:
            pipe.zrem(self._key("open_parents"), job.id)
        else:
            pipe.zadd(self._key("open_parents"), {job.id: stored.seq})

    def _delete(self, pipe: Pipeline, stored: _Stored) -> None:
        """Queue the deletion of a job's record and its index entries (after multi())."""
        job_id = stored.job.id
        pipe.delete(self._key("job", job_id))
        for key in ("jobs", "open_parents", "finished", "records"):
            pipe.zrem(self._key(key), job_id)
        pipe.zrem(self._key("status", stored.status), job_id)
        pipe.zrem(self._key("work", stored.status), job_id)
        if stored.parent:
            pipe.zrem(self._key("children", stored.parent), job_id)

    def _zrange(self, key: str) -> list[str]:
        return cast("list[str]", self._redis.zrange(key, 0, -1))

    def _jobs(self, job_ids: list[str]) -> list[Job]:
        """The jobs by id, in that order (one removed meanwhile is left out)."""
        if not job_ids:
            return []
        with self._redis.pipeline() as pipe:
            for job_id in job_ids:
                pipe.hmget(self._key("job", job_id), ["data", "request"])
            rows = pipe.execute()
        return [_job(data, request) for data, request in rows if data is not None]

    # --- webhook deliveries ------------------------------------------------------

    @_guard
    def add_delivery(self, delivery: Delivery, due_at: float) -> None:
        """Store a pending delivery due at `due_at`; a repeated id changes nothing."""
        key = self._key("delivery", delivery.id)

        def body(pipe: Pipeline) -> None:
            if pipe.exists(key):
                return
            record = {**asdict(delivery), "attempts": 0, "state": "pending", "last_error": None}
            pipe.multi()
            pipe.set(key, json.dumps(record))
            pipe.zadd(self._key("deliveries", "due"), {delivery.id: due_at})
            pipe.rpush(self._key("deliveries", "job", delivery.job_id), delivery.id)

        self._atomic([key], body)

    @_guard
    def due_deliveries(self, now: float, limit: int = 20) -> list[Delivery]:
        """Pending deliveries due by `now`, earliest first, CLAIMED for the caller: every
        pod sends webhooks, so the ones returned are pushed `DELIVERY_LEASE_S` past `now`
        in the same transaction, and another pod does not get them meanwhile. The caller
        then calls `record_attempt`, which sets their real state and next time; an
        attempt never recorded (the pod died) is due again when the lease ends."""
        due_key = self._key("deliveries", "due")

        def body(pipe: Pipeline) -> list[Delivery]:
            ids = cast("list[str]", pipe.zrangebyscore(due_key, "-inf", now, start=0, num=limit))
            if not ids:
                return []
            records = cast("list[str | None]", pipe.mget([self._key("delivery", i) for i in ids]))
            pipe.multi()
            pipe.zadd(due_key, dict.fromkeys(ids, now + self.DELIVERY_LEASE_S), xx=True)
            return [_delivery(json.loads(record)) for record in records if record is not None]

        return self._atomic([due_key], body)

    @_guard
    def next_delivery_due(self) -> float | None:
        first = cast(
            "list[tuple[str, float]]",
            self._redis.zrange(self._key("deliveries", "due"), 0, 0, withscores=True),
        )
        return float(first[0][1]) if first else None

    @_guard
    def record_attempt(
        self, delivery_id: str, *, state: str, next_attempt_at: float, error: str | None
    ) -> None:
        """`state`: pending (retry at next_attempt_at), delivered or failed (gave up)."""
        key, due_key = self._key("delivery", delivery_id), self._key("deliveries", "due")

        def body(pipe: Pipeline) -> None:
            data = cast("str | None", pipe.get(key))
            if data is None:
                return
            record = json.loads(data)
            record.update(attempts=record["attempts"] + 1, state=state, last_error=error)
            pipe.multi()
            pipe.set(key, json.dumps(record))
            if state == "pending":
                pipe.zadd(due_key, {delivery_id: next_attempt_at})
            else:
                pipe.zrem(due_key, delivery_id)

        self._atomic([key], body)

    @_guard
    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        ids = cast("list[str]", self._redis.lrange(self._key("deliveries", "job", job_id), 0, -1))
        if not ids:
            return []
        records = cast(
            "list[str | None]", self._redis.mget([self._key("delivery", i) for i in ids])
        )
        fields = ("id", "event_type", "attempts", "state", "last_error")
        return [
            {name: record[name] for name in fields}
            for record in (json.loads(data) for data in records if data is not None)
        ]

    # --- uploads -------------------------------------------------------------------

    @_guard
    def add_upload(self, upload: Upload) -> None:
        """Store an upload's record; an id that exists is refused (as SQLite does)."""
        key = self._key("upload", upload.id)

        def body(pipe: Pipeline) -> None:
            if pipe.exists(key):
                raise IdempotencyConflict(f"upload {upload.id} exists already", upload_id=upload.id)
            pipe.multi()
            pipe.set(key, json.dumps(asdict(upload)))
            pipe.zadd(self._key("uploads"), {upload.id: upload.created_at})

        self._atomic([key], body)

    @_guard
    def get_upload(self, upload_id: str) -> Upload | None:
        data = cast("str | None", self._redis.get(self._key("upload", upload_id)))
        return None if data is None else Upload(**json.loads(data))


def _batches(items: Iterator[str], size: int = 500) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _delivery(record: dict[str, Any]) -> Delivery:
    return Delivery(
        id=record["id"],
        job_id=record["job_id"],
        url=record["url"],
        event_type=record["event_type"],
        payload=record["payload"],
        attempts=record["attempts"],
    )
