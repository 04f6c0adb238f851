"""A per-file download lock that works on network volumes shared by several pods.

Why not `fcntl.flock`/`lockf`: on NFS and the FUSE/Ceph volumes that cloud GPU providers
mount, advisory locks are emulated, silently local to one client, or lost when a client
reconnects; and a lock held by a pod that was killed may never be released. Instead:

- **Take**: create `<file>.lock` with `O_CREAT | O_EXCL` (atomic on NFSv3+ and on local
  file systems); it holds JSON naming the holder (host, pid, a random token).
- **Hold**: the holder touches the lock's mtime every `heartbeat_s` (a heartbeat), and
  checks that the file still carries its token; if not, it has lost the lock and stops.
- **Wait**: another process that finds the lock polls until the final file appears (done,
  no download) or the lock disappears (the holder finished or failed: try to take it).
- **Stale**: the lock is stale when its mtime is older than `stale_after_s` by the
  waiter's clock, or when the waiter has seen it unchanged for `stale_after_s` on its own
  monotonic clock (this second rule is immune to clock skew between pods and the file
  server). Keep `stale_after_s` well above `heartbeat_s` and above the volume's attribute
  cache time (NFS `actimeo`, up to 60 s by default).
- **Take over**: a waiter that judges the lock stale first takes `<file>.lock.break`
  (also `O_EXCL`), so that only one of several waiters breaks it; checks that the lock is
  still the one it judged stale (same inode, size and mtime); deletes it; and then
  competes for the lock like anybody else.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_Signature = tuple[int, int, int]  # inode, size, mtime_ns


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Seen:
    signature: _Signature
    since: float  # monotonic time when this signature was first seen


class FileLock:
    """The lock of one file. Not reentrant; one instance per attempt to hold it."""

    def __init__(self, path: Path, *, stale_after_s: float = 120.0) -> None:
        self.path = path
        self.break_path = path.with_name(path.name + ".break")
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self.holder_info: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "since": time.time(),
        }
        self._seen: _Seen | None = None

    # --- holding ---------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Create the lock file; False when it exists already."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.holder_info, f)
            f.flush()
            os.fsync(f.fileno())
        self._seen = None
        return True

    def owned(self) -> bool:
        """The lock file exists and carries this instance's token."""
        return self._read().get("token") == self.token

    def heartbeat(self) -> bool:
        """Touch the lock's mtime; False (nothing touched) when the lock is no longer ours."""
        if not self.owned():
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            return False
        return True

    def release(self) -> None:
        """Delete the lock if it is still ours."""
        if self.owned():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # --- waiting ---------------------------------------------------------------

    def holder(self) -> str:
        """Who holds the lock, for log lines ("host pid 123"), or "unknown"."""
        info = self._read()
        if "host" in info:
            return f"{info['host']} pid {info.get('pid')}"
        return "unknown"

    def break_if_stale(self) -> bool:
        """Delete the lock if it is stale. True when it was deleted (try to take it now).

        Call it on every poll: it also records when the lock was last seen to change.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen = None
            return True
        signature = _signature(st)
        now = time.monotonic()
        if self._seen is None or self._seen.signature != signature:
            self._seen = _Seen(signature, now)
        age = time.time() - st.st_mtime
        unchanged = now - self._seen.since
        if age <= self.stale_after_s and unchanged <= self.stale_after_s:
            return False
        return self._break(signature)

    def _break(self, judged: _Signature) -> bool:
        try:
            fd = os.open(self.break_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # Another waiter is breaking it now, or died doing so long ago (clear that).
            with contextlib.suppress(FileNotFoundError):
                if time.time() - self.break_path.stat().st_mtime > self.stale_after_s:
                    self.break_path.unlink()
            return False
        os.close(fd)
        try:
            try:
                current = _signature(self.path.stat())
            except FileNotFoundError:
                return True
            if current != judged:
                return False  # refreshed or replaced since we judged it: alive
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._seen = None
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.break_path.unlink()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
