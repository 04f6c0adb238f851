"""Retention at scale: what the API feels while the retention pass runs over a big store.

A job store is filled straight through SQLite (`--jobs`, default 500,000 finished jobs,
all but `--due` of them with their files already expired, as after months of service),
then two arms run the same pass while a reader thread times `store.get` of random jobs
(what `GET /v1/jobs/{id}` costs; the Python lock and GIL stand in for the event loop):

- before: the pass as it was (every terminal job's JSON read and parsed, then filtered),
  marking the due jobs with a synced write each;
- after: `retention.sweep` (the `jobs_retention` index, 500 jobs a page, unsynced marks).

Printed: each arm's pass time, the reader's GET p50/p99/max during it (the max is the
API's freeze), and the process RSS growth; PASS when the after arm's longest GET is under
100 ms and its RSS growth under 20 MB. The fill is synced to disk before the arms run (a
live store has no 400 MB of dirty pages waiting for the pass's first fsync).

Usage: `.venv/bin/python bench/retention.py [--jobs 500000] [--due 1000]
[--out build/bench-retention.json]`
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

from model_service.jobs.record import Job
from model_service.jobs.status import TERMINAL, JobStatus
from model_service.jobs.store import SqliteJobStore
from model_service.retention import sweep
from model_service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 1e6


def fill(store: SqliteJobStore, path: Path, jobs: int, due: int) -> list[str]:
    """`jobs` finished a day ago; the last `due` with files still to delete."""
    store.create(
        Job("template", JobStatus.QUEUED, {"prompt": "a fox"}, {"prompt": "a fox"}, 7, "h")
    )
    store.close()
    template = Job("x", JobStatus.SUCCEEDED, {"prompt": "a fox"}, {"prompt": "a fox"}, 7, "h")
    finished = time.time() - 86_400
    ids = [f"job{index:07d}" for index in range(jobs)]
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    rows: list[tuple[object, ...]] = []
    for index, job_id in enumerate(ids):
        expired = index < jobs - due
        row = template.to_row() | {
            "id": job_id,
            "finished_at": finished + index * 0.001,
            "outputs": ["output_0.png"],
            "outputs_expired": expired,
        }
        rows.append(
            (job_id, "succeeded", finished, json.dumps(row), row["finished_at"], int(expired))
        )
        if len(rows) == 50_000:
            _insert(db, rows)
            rows = []
    _insert(db, rows)
    db.close()
    os.sync()  # the fill's dirty pages out now, not in the first fsync the pass makes
    return ids


def _insert(db: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    db.executemany(
        "INSERT INTO jobs (id, status, created_at, data, finished_at, outputs_expired) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.commit()


def before(settings: Settings, store: SqliteJobStore) -> int:
    """The pass before the index: every terminal job read and parsed, then filtered."""
    cutoff = time.time() - settings.output_retention_hours * 3600
    with store._guard():  # as the old finished_before held it
        rows = store._db.execute(
            "SELECT data FROM jobs WHERE status IN (?, ?, ?)",
            tuple(status.value for status in TERMINAL),
        ).fetchall()
    jobs = [Job.from_row(json.loads(row["data"])) for row in rows]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500_000)
    parser.add_argument("--due", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "build" / "bench-retention.json"))
    args = parser.parse_args()
    results = {}
    for arm in ("before", "after"):  # each on a fresh store of the same content
        root = Path(tempfile.mkdtemp(prefix=f"bench-retention-{arm}-"))
        try:
            settings = Settings(data_dir=root, output_retention_hours=1)
            ids = fill(SqliteJobStore(settings.db_path), settings.db_path, args.jobs, args.due)
            store = SqliteJobStore(settings.db_path)
            run = partial(before if arm == "before" else sweep, settings, store)
            results[arm] = timed_reads(store, ids, run)
            store.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"{arm:7s}", results[arm], flush=True)
    after = results["after"]
    ok = after["get_max_ms"] < 100 and after["rss_growth_mb"] < 20 and after["marked"] == args.due
    first = results["before"]
    print(
        f"retention over {args.jobs} jobs ({args.due} due): the longest GET during the pass "
        f"{first['get_max_ms']} -> {after['get_max_ms']} ms "
        f"({first['get_max_ms'] / max(after['get_max_ms'], 1e-6):.0f}x), p99 "
        f"{first['get_p99_ms']} -> {after['get_p99_ms']} ms, RSS growth "
        f"{first['rss_growth_mb']} -> {after['rss_growth_mb']} MB, pass {first['pass_s']} -> "
        f"{after['pass_s']} s; load {os.getloadavg()[0]:.2f}: {'PASS' if ok else 'FAIL'}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **results, "pass": ok}, indent=2))


if __name__ == "__main__":
    main()
