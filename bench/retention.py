"""Retention at scale: what the API feels while the retention pass runs over a big store.

A job store is filled straight through SQLite (`--jobs`, default 500,000 finished jobs,
all but `--due` of them with their files already expired, as after months of service;
the oldest `--old`, default 100,000, finished 40 days ago, past the default 30 days of
JOB_RECORD_RETENTION_DAYS, every 50th of them a long video with two parts, and every
5th job with a webhook delivery), then two arms run the same pass while a reader thread
times `store.get` of random jobs that stay (what `GET /v1/jobs/{id}` costs; the Python
lock and GIL stand in for the event loop):

- before: the pass as it was (every terminal job's JSON read and parsed, then filtered),
  marking the due jobs with a synced write each; records were never deleted;
- after: `retention.sweep` (the `jobs_retention` index, 500 jobs a page, unsynced marks;
  then the records past their retention, 500 graphs a transaction from `jobs_records`).

Printed: each arm's pass time, the reader's GET p50/p99/max during it (the max is the
API's freeze; "idle": the same reads with no pass), the process RSS growth and the rows
deleted; PASS when the after arm's
longest GET is under 100 ms, its RSS growth under 20 MB, and it marked every due job and
deleted every old one (their parts and deliveries with them). The fill is synced to
disk before the arms run (a live store has no 400 MB of dirty pages waiting for the
pass's first fsync).

Then, if a redis-server is there (`make redis`), the fleet's store: `--redis-jobs`
(default 50,000) finished jobs in a RedisJobStore, and one page of `finished_before`
(500 jobs) timed with the jobs it read, before (every terminal job read, as before the
N:finished index) and after; the one-time index build for a store written before the
index; and a whole `sweep` (expire and prune) over it. PASS when a page reads 500 jobs.

Usage: `.venv/bin/python bench/retention.py [--jobs 500000] [--due 1000] [--old 100000]
[--redis-jobs 50000] [--out build/bench-retention.json]`
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from model_service.jobs.record import Job
from model_service.jobs.redis_store import RedisJobStore
from model_service.jobs.status import TERMINAL, JobStatus
from model_service.jobs.store import SqliteJobStore
from model_service.retention import sweep
from model_service.settings import Settings
from model_service_testing.process import RedisServer

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
DAY = 86_400
GRAPH_EVERY = 50  # every 50th old job is a long video; its next two are its parts


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 1e6


def template() -> Job:
    return Job("x", JobStatus.SUCCEEDED, {"prompt": "a fox"}, {"prompt": "a fox"}, 7, "h")


def fill(store: SqliteJobStore, path: Path, jobs: int, due: int, old: int) -> list[str]:
    """`jobs` finished a day ago, the first `old` of them 40 days ago (some long videos
    with their parts); the last `due` with files still to delete. Returns the ids that
    stay (the reader's)."""
    store.create(
        Job("template", JobStatus.QUEUED, {"prompt": "a fox"}, {"prompt": "a fox"}, 7, "h")
    )
    store.close()
    base, request = template().state_row(), json.dumps(template().request_row())
    now = time.time()
    ids = [f"job{index:07d}" for index in range(jobs)]
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    rows: list[tuple[object, ...]] = []
    deps: list[tuple[str, str]] = []
    deliveries: list[tuple[object, ...]] = []
    for index, job_id in enumerate(ids):
        expired = index < jobs - due
        finished = now - (40 * DAY if index < old else DAY) + index * 0.001
        parent, is_parent = None, 0
        if index < old and index % GRAPH_EVERY == 0 and index + 2 < old:
            is_parent = 1  # its parts: the next two jobs
        elif index % GRAPH_EVERY in (1, 2) and index - index % GRAPH_EVERY + 2 < old:
            parent = ids[index - index % GRAPH_EVERY]
            finished -= 1.0  # a part ends before its video
            if index % GRAPH_EVERY == 2:
                deps.append((job_id, ids[index - 1]))
        row = base | {
            "id": job_id,
            "finished_at": finished,
            "outputs": ["output_0.png"],
            "outputs_expired": expired,
            "kind": "chain" if is_parent else "job",
            "parent_id": parent,
        }
        rows.append(
            (
                job_id,
                "succeeded",
                finished,
                json.dumps(row),
                request,
                finished,
                int(expired),
                parent,
                is_parent,
            )
        )
        if index % 5 == 0:
            deliveries.append((f"d{index}", job_id, "https://hook", "job.succeeded", "{}", now))
        if len(rows) == 50_000:
            _insert(db, rows, deps, deliveries)
            rows, deps, deliveries = [], [], []
    _insert(db, rows, deps, deliveries)
    db.close()
    os.sync()  # the fill's dirty pages out now, not in the first fsync the pass makes
    return ids[old:]


def _insert(
    db: sqlite3.Connection,
    rows: Sequence[tuple[object, ...]],
    deps: Sequence[tuple[str, str]],
    deliveries: Sequence[tuple[object, ...]],
) -> None:
    db.executemany(
        "INSERT INTO jobs (id, status, created_at, data, request, finished_at, "
        "outputs_expired, parent_id, is_parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.executemany("INSERT INTO job_deps (job_id, depends_on) VALUES (?, ?)", deps)
    db.executemany(
        "INSERT INTO webhook_deliveries (id, job_id, url, event_type, payload, "
        "next_attempt_at, state) VALUES (?, ?, ?, ?, ?, ?, 'delivered')",
        deliveries,
    )
    db.commit()


def counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return {
            table: int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("jobs", "job_deps", "webhook_deliveries")
        }


def before(settings: Settings, store: SqliteJobStore) -> int:
    """The pass before the index: every terminal job read and parsed, then filtered."""
    cutoff = time.time() - settings.output_retention_hours * 3600
    with store._guard():  # as the old finished_before held it
        rows = store._db.execute(
            "SELECT data, request FROM jobs WHERE status IN (?, ?, ?)",
            tuple(status.value for status in TERMINAL),
        ).fetchall()
    jobs = [Job.from_row(json.loads(row["data"]) | json.loads(row["request"])) for row in rows]
    due = [j for j in jobs if j.finished_at and j.finished_at < cutoff and not j.outputs_expired]
    for job in due:
        shutil.rmtree(settings.job_dir(job.id), ignore_errors=True)
        store.update(job.id, lambda record: setattr(record, "outputs_expired", True))
    return len(due)


def timed_reads(store: SqliteJobStore, ids: list[str], run: Callable[[], int]) -> dict[str, float]:
    """Run the pass while a thread reads random jobs; the reads' latencies, RSS growth."""
    stop, latencies, peak = threading.Event(), [], [rss_mb()]
    for job_id in ids[:: max(1, len(ids) // 200)]:  # warm: the pages a live API has read
        store.get(job_id)
    store.update(ids[0], lambda record: None)  # and its first write (the WAL) is long done
    start_rss = rss_mb()

    def reader() -> None:
        pick = random.Random(1)
        while not stop.is_set():
            began = time.perf_counter()
            store.get(pick.choice(ids))
            latencies.append(time.perf_counter() - began)
            peak.append(rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=reader)
    thread.start()
    began = time.perf_counter()
    done = run()
    took = time.perf_counter() - began
    stop.set()
    thread.join()
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "pass_s": round(took, 3),
        "marked": done,
        "get_p50_ms": round(statistics.median(latencies) * 1000, 3),
        "get_p99_ms": round(cuts[98] * 1000, 3),
        "get_max_ms": round(max(latencies) * 1000, 3),
        "rss_growth_mb": round(max(peak) - start_rss, 1),
        "reads": len(latencies),
    }


def redis_arm(root: Path, jobs: int, due: int, old: int) -> dict[str, Any]:
    """The fleet's store: one page of `finished_before` before and after its index."""
    settings = Settings(data_dir=root, output_retention_hours=1)
    with RedisServer(root / "redis") as server:
        store = RedisJobStore(server.url, "ms:bench")
        now, batch = time.time(), []
        for index in range(jobs):  # the first `old` past the record retention
            job = template()
            job.id = f"job{index:07d}"
            job.finished_at = now - (40 * DAY if index < old else DAY) + index * 0.001
            job.outputs_expired = index < jobs - due
            batch.append(job)
            if len(batch) == 5000 or index == jobs - 1:
                with store._redis.pipeline() as pipe:  # as `create` writes them, at once
                    store._insert(pipe, batch, store._reserve_seqs(len(batch)))
                    pipe.execute()
                batch = []
        cutoff = now - 3600
        read: list[int] = []
        load = store._jobs
        store._jobs = lambda job_ids: read.append(len(job_ids)) or load(job_ids)  # type: ignore[method-assign]

        began = time.perf_counter()  # before: every terminal job read, then one page
        with store._redis.pipeline() as pipe:
            for status in sorted(status.value for status in TERMINAL):
                pipe.zrange(store._key("status", status), 0, -1)
            every = store._jobs([job_id for ids in pipe.execute() for job_id in ids])
        old_page = sorted(
            (
                j
                for j in every
                if j.finished_at and j.finished_at < cutoff and not j.outputs_expired
            ),
            key=lambda j: (j.finished_at or 0.0, j.id),
        )[:500]
        before_s, before_read = time.perf_counter() - began, sum(read)

        began = time.perf_counter()  # the index, once, from the records written before it
        store._ensure_indexes()
        build_s = time.perf_counter() - began
        read.clear()
        began = time.perf_counter()
        page = store.finished_before(cutoff, limit=500)
        after_s, after_read = time.perf_counter() - began, sum(read)
        assert [j.id for j in page] == [j.id for j in old_page]

        began = time.perf_counter()
        marked = sweep(settings, store)
        sweep_s = time.perf_counter() - began
        left = int(store._redis.zcard(store._key("jobs")))
        store.close()
    return {
        "jobs": jobs,
        "page_before_s": round(before_s, 3),
        "page_before_read": before_read,
        "page_after_s": round(after_s, 4),
        "page_after_read": after_read,
        "index_build_s": round(build_s, 2),
        "sweep_s": round(sweep_s, 2),
        "marked": marked,
        "pruned": jobs - left,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500_000)
    parser.add_argument("--due", type=int, default=1000)
    parser.add_argument("--old", type=int, default=100_000)
    parser.add_argument("--redis-jobs", type=int, default=50_000)
    parser.add_argument("--out", default=str(REPO / "build" / "bench-retention.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for arm in ("before", "after"):  # each on a fresh store of the same content
        root = Path(tempfile.mkdtemp(prefix=f"bench-retention-{arm}-"))
        try:
            settings = Settings(data_dir=root, output_retention_hours=1)
            kept = fill(
                SqliteJobStore(settings.db_path), settings.db_path, args.jobs, args.due, args.old
            )
            store = SqliteJobStore(settings.db_path)
            rows = counts(settings.db_path)
            if arm == "after":  # the reference: the same reads with no pass running
                results["idle"] = timed_reads(store, kept, lambda: time.sleep(3) or 0)
                print("idle   ", results["idle"], flush=True)
            run = partial(before if arm == "before" else sweep, settings, store)
            results[arm] = timed_reads(store, kept, run)
            store.close()
            left = counts(settings.db_path)
            results[arm]["deleted"] = {table: rows[table] - left[table] for table in rows}
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{arm:7s}", results[arm], flush=True)
    after, first = results["after"], results["before"]
    ok = (
        after["get_max_ms"] < 100
        and after["rss_growth_mb"] < 20
        and after["marked"] == args.due
        and after["deleted"]["jobs"] == args.old
    )
    print(
        f"retention over {args.jobs} jobs ({args.due} due, {args.old} past the record "
        f"retention): the longest GET during the pass {first['get_max_ms']} -> "
        f"{after['get_max_ms']} ms "
        f"({first['get_max_ms'] / max(after['get_max_ms'], 1e-6):.0f}x), p99 "
        f"{first['get_p99_ms']} -> {after['get_p99_ms']} ms, RSS growth "
        f"{first['rss_growth_mb']} -> {after['rss_growth_mb']} MB, pass {first['pass_s']} -> "
        f"{after['pass_s']} s (GET p99 with no pass: {results['idle']['get_p99_ms']} ms); "
        f"records deleted {after['deleted']}; "
        f"load {os.getloadavg()[0]:.2f}: {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    results["pass"] = ok
    if RedisServer.binary() is None:
        print("redis: no redis-server (`make redis`): the Redis store's part skipped")
    else:
        root = Path(tempfile.mkdtemp(prefix="bench-retention-redis-"))
        try:
            share = args.old / args.jobs  # as many past the record retention as above
            redis = results["redis"] = redis_arm(
                root, args.redis_jobs, args.due, int(args.redis_jobs * share)
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        redis_ok = (
            redis["page_after_read"] == min(500, args.due)
            and redis["marked"] == args.due
            and redis["pruned"] == int(args.redis_jobs * share)
        )
        print(
            f"redis over {redis['jobs']} jobs: a page of finished_before (500) read "
            f"{redis['page_before_read']} -> {redis['page_after_read']} jobs, "
            f"{redis['page_before_s']} -> {redis['page_after_s']} s; index built once in "
            f"{redis['index_build_s']} s; a sweep {redis['sweep_s']} s (files of "
            f"{redis['marked']} jobs, {redis['pruned']} records deleted): "
            f"{'PASS' if redis_ok else 'FAIL'}",
            flush=True,
        )
        results["pass"] = ok and redis_ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
