"""A job's own log: the lines logged about it while it ran, kept with the job
(`GET /v1/jobs/{id}/logs`), so a failure comes with its evidence.

Captured per process by a structlog processor (`JOB_LOGS`): a line logged with a
`job_id` (bound with `structlog.contextvars`, as the runner and the worker do, or given
as a key) while that job's capture is open is kept, rendered as one plain line
(`<time> <level> <logger>: <event> key=value ...`) and scrubbed of secrets like every
other line. Other sources add their lines themselves (`add`: ComfyUI's output while the
job's prompt runs). The worker process sends its lines with the job's end (`JobDone.log`).
A job keeps its lines at every level, DEBUG included, whatever LOG_LEVEL says
(the process's own output still follows LOG_LEVEL); the access lines of clients asking
about the job are not kept.

A job keeps at most JOB_LOG_LINES lines: the first tenth and the most recent rest (the
end of a failure is where its cause is), with one line saying how many were left out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any

_HIDDEN = {"event", "timestamp", "level", "logger", "job_id", "request_id", "service", "exc_info"}
# lines about the job that are not its run: clients asking for it (GET /v1/jobs/{id})
_NOT_KEPT = {"model_service.http"}
MAX_LINE_CHARS = 2000


class _Buffer:
    def __init__(self, max_lines: int) -> None:
        self.head: list[str] = []
        self.head_max = max(1, max_lines // 10)
        self.tail: deque[str] = deque(maxlen=max(1, max_lines - self.head_max))
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self.head) < self.head_max:
            self.head.append(line)
            return
        if len(self.tail) == self.tail.maxlen:
            self.dropped += 1
        self.tail.append(line)

    def lines(self) -> list[str]:
        # stamped as the line after it, so that it keeps its place in time order
        gap = [f"{self.tail[0][:24]} ... {self.dropped} lines left out"] if self.dropped else []
        return [*self.head, *gap, *self.tail]


class JobLogs:
    def __init__(self, max_lines: int = 500) -> None:
        self.max_lines = max_lines
        self._redact: Callable[[str], str] = lambda text: text
        self._open: dict[str, _Buffer] = {}
        self._lock = threading.Lock()

    def configure(self, max_lines: int, redact: Callable[[str], str] | None = None) -> None:
        self.max_lines = max_lines
        if redact is not None:
            self._redact = redact

    def open(self, job_id: str) -> None:
        """Keep the job's lines from now on (nothing when JOB_LOG_LINES is 0)."""
        if self.max_lines > 0:
            with self._lock:
                self._open.setdefault(job_id, _Buffer(self.max_lines))

    def is_open(self, job_id: str) -> bool:
        return job_id in self._open

    def add(self, job_id: str, text: str, source: str, at: float | None = None) -> None:
        """A line from elsewhere (e.g. ComfyUI's output), stamped now or at `at`."""
        buffer = self._open.get(job_id)
        if buffer is not None:
            line = f"{_stamp(at)} {source}: {text.rstrip()}"
            with self._lock:
                buffer.add(self._redact(line[:MAX_LINE_CHARS]))

    def extend(self, job_id: str, lines: Iterable[str]) -> None:
        """Lines rendered elsewhere (the worker process's), each with its own time."""
        buffer = self._open.get(job_id)
        if buffer is not None:
            with self._lock:
                for line in lines:
                    buffer.add(line[:MAX_LINE_CHARS])

    def peek(self, job_id: str) -> list[str] | None:
        """The lines so far (in time order) of a job still captured here, else None."""
        with self._lock:
            buffer = self._open.get(job_id)
            return None if buffer is None else merged(buffer.lines())

    def take(self, job_id: str) -> list[str]:
        """The job's lines, in time order; its capture ends."""
        with self._lock:
            buffer = self._open.pop(job_id, None)
        return [] if buffer is None else merged(buffer.lines())

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """The structlog processor (after the timestamp, before rendering)."""
        job_id = event.get("job_id")
        if job_id is not None and job_id in self._open and event.get("logger") not in _NOT_KEPT:
            buffer = self._open.get(job_id)
            if buffer is not None:
                line = self._redact(_render(event)[:MAX_LINE_CHARS])
                with self._lock:
                    buffer.add(line)
        return event


def merged(lines: Iterable[str]) -> list[str]:
    """In time order: each line starts with its ISO UTC time (a stable sort: lines of
    one time keep their order)."""
    return sorted(lines, key=lambda line: line[:24])


def _stamp(at: float | None) -> str:
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _render(event: MutableMapping[str, Any]) -> str:
    stamp = str(event.get("timestamp") or _stamp(None))
    if len(stamp) > 24:  # structlog's iso stamp has microseconds: cut to our width
        stamp = stamp[:23] + "Z"
    extras = " ".join(f"{k}={v}" for k, v in event.items() if k not in _HIDDEN)
    text = f"{stamp} {event.get('level', 'info')} {event.get('logger', '')}: {event.get('event')}"
    error = event.get("exc_info")
    if isinstance(error, BaseException):
        extras += f" error={type(error).__name__}: {error}"
    return f"{text} {extras}".rstrip()


JOB_LOGS = JobLogs()
