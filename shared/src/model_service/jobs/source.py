"""Where the runner gets its next job: the embedded store (one machine) or a fleet's
queue on Redis (`model_service.fleet.source`). The runner does the same with either:
take a claim, hold it while the job runs, record the end, then tell the source. A source
knows no runner: what it may ask of the one that takes its jobs comes at `start`
(`RunnerLink`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from model_service.background import TaskHealth
from model_service.jobs.record import Job
from model_service.jobs.store import RunQueue
from model_service.settings import Settings


@dataclass
class Claim:
    """A job this process runs now (moved to `running` in the store)."""

    job: Job
    lease: Any = None  # a fleet's queue lease (model_service.fleet.queue.Lease)
    lost: bool = False  # a fleet took it back meanwhile: the end is not ours to record

    @property
    def start_recorded(self) -> bool:
        """The claim recorded the job's start (`take(starts_now=True)`): the engine began
        it at once, so no second write says so."""
        return self.job.started_at is not None


@dataclass(frozen=True)
class RunnerLink:
    """What a source may ask of the runner that takes its jobs."""

    tasks: TaskHealth  # the service's background tasks: a source's own run among them
    cancel_here: Callable[[str], None]  # stop this job if this process's engine holds it


class JobSource(Protocol):
    # whether the runner requeues, on start, the jobs the store shows as running (one
    # machine: they were ours); a fleet takes back a dead pod's jobs by heartbeat instead
    recovers_on_start: bool

    async def start(self, link: RunnerLink) -> None: ...
    async def stop(self) -> None: ...
    def wake(self) -> None:
        """There may be new work (a job submitted, retried, its dependencies met)."""

    async def share_inputs(self, job_id: str, inputs_dir: Path) -> None:
        """Before a job is stored: make its input files reachable by whoever runs it."""

    async def submitted(self, job: Job) -> None:
        """A new job is stored."""

    async def take(self, starts_now: bool = False) -> Claim | None:
        """The next job to run, or None after waiting a while. `starts_now`: the engine
        holds no other job and begins this one at once, so the claim records its start
        (else the runner writes it when the engine begins the job)."""

    def hold(
        self, claim: Claim, progress: Callable[[], tuple[int, int]]
    ) -> AbstractAsyncContextManager[None]:
        """While the job runs (a fleet: the heartbeat, and cancels from other pods)."""

    async def local_inputs(self, job: Job) -> dict[str, Any]:
        """The job's prepared input, its files on this machine."""

    async def share_outputs(self, job: Job, output_dir: Path, names: list[str]) -> None:
        """Before a long video's part is recorded as succeeded: make the outputs the other
        parts use reachable by whoever runs them."""

    async def local_outputs(self, job_id: str, names: list[str]) -> list[str]:
        """Puts `names` of `job_id`'s outputs in its outputs folder on this machine;
        returns those that cannot be found."""

    async def ended(self, claim: Claim) -> None:
        """The job's end is recorded in the store: acknowledge it."""

    async def give_back(self, claim: Claim) -> None:
        """The process stops while `claim` runs: the job runs again elsewhere or later."""

    def interrupted(self, claims: list[Claim]) -> list[Job]:
        """The running jobs this process leaves behind when it stops (`claims`: those it
        holds)."""

    async def save_upload(self, upload_id: str, path: Path) -> None: ...
    async def read_upload(self, upload_id: str) -> bytes | None: ...


class LocalSource:
    """The embedded SQLite store: this process is the only runner."""

    recovers_on_start = True

    def __init__(self, settings: Settings, store: RunQueue) -> None:
        self._settings = settings
        self._store = store
        self._wake = asyncio.Event()

    async def start(self, link: RunnerLink) -> None:
        pass

    async def stop(self) -> None:
        pass

    def wake(self) -> None:
        self._wake.set()

    async def share_inputs(self, job_id: str, inputs_dir: Path) -> None:
        pass  # on this machine already

    async def submitted(self, job: Job) -> None:
        self.wake()

    async def take(self, starts_now: bool = False) -> Claim | None:
        self._wake.clear()
        job = self._store.claim_next(starts_now)
        if job is None:
            await self._wake.wait()
            return None
        return Claim(job)

    @asynccontextmanager
    async def hold(
        self, claim: Claim, progress: Callable[[], tuple[int, int]]
    ) -> AsyncIterator[None]:
        yield

    async def local_inputs(self, job: Job) -> dict[str, Any]:
        return dict(job.prepared_input)

    async def share_outputs(self, job: Job, output_dir: Path, names: list[str]) -> None:
        pass  # on this machine already

    async def local_outputs(self, job_id: str, names: list[str]) -> list[str]:
        output_dir = self._settings.job_dir(job_id) / "outputs"
        return [name for name in names if not (output_dir / name).is_file()]

    async def ended(self, claim: Claim) -> None:
        pass

    async def give_back(self, claim: Claim) -> None:
        pass  # the store shows it running: `interrupted` requeues it

    def interrupted(self, claims: list[Claim]) -> list[Job]:
        return self._store.running()

    async def save_upload(self, upload_id: str, path: Path) -> None:
        pass

    async def read_upload(self, upload_id: str) -> bytes | None:
        path = self._settings.uploads_dir / upload_id
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
