"""Job graphs: a parent job made of child jobs (the segments or legs of a long video).

A parent runs nothing itself. Its children are plain jobs in the same store, run by the
same runner, each after the jobs in its `depends_on` succeeded (`JobStore.claim_next`).
The coordinator here keeps the parent's record in step with its children:

- status: queued until a child starts; running while any child runs or waits; failed
  (or canceled) when a child failed (or was canceled), and then the children still
  queued or running are canceled; when every child succeeded, the parent's composer
  joins their outputs (stitching) and the parent succeeds. An interactive parent waits
  in `awaiting_input` instead, until the client adds a part or finalizes it;
- progress: the children's progress summed (each child counts 100 units);
- cancel cascades to the children; retry queues the failed and canceled children again
  and keeps the ones that succeeded.

Everything is level-triggered: `reconcile(parent)` reads the children from the store
and does what their states call for, so it is safe to repeat, and a restart simply
reconciles every open parent (a composition cut short by the restart runs again). The
coordinator hears of a part's status change from the store's change feed (from `start`
to `stop`: `start` reconciles every open parent, so nothing before it is missed), and
of its progress from the runner (`on_progress`); it publishes the parent's summed
progress itself (`JobRunner.publish_progress`).

In a fleet (QUEUE_URL) the parts run on any pod: their files travel through the job
source (`share_outputs`, `local_inputs`, `local_outputs`); every pod reconciles (a write
that lost a race with another pod's is simply reconciled again, and every pod's sweep
reconciles the open parents, so a pod that died mid-way leaves nothing stuck); and the
composition is queued (`Compositions`: model_service.fleet.compose) so that exactly one
pod runs it, and another takes it over if that pod dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

from model_service.background import TaskHealth
from model_service.errors import (
    ComposeFailed,
    InputMissing,
    InvalidTransition,
    PartFailed,
    ServiceError,
)
from model_service.jobs.changes import fail_with_dict, finish_now, mark_cancel_requested
from model_service.jobs.feed import ChangeKind, JobChange
from model_service.jobs.record import Job, JobKind, JobPlan
from model_service.jobs.retry import RETRYABLE, check_retryable, reset_for_retry, reset_parent
from model_service.jobs.status import TRANSITIONS, JobStatus
from model_service.jobs.store import GraphStore
from model_service.logs import get_logger
from model_service.runner import JobRunner
from model_service.settings import Settings
from model_service.storage import OutputStore

log = get_logger("model_service.graph")

UNITS_PER_CHILD = 100  # parent progress: each child counts this many steps


class Composer(Protocol):
    """What one kind of parent does with its children's outputs. Both methods run in a
    worker thread and raise `ServiceError` (or ValueError/OSError) on failure."""

    def after_part(
        self, parent: Job, child: Job, output_dir: Path, outputs: list[str]
    ) -> tuple[list[str], dict[str, Any]]:
        """After a child ran, before it is recorded as succeeded: more output files (in
        `output_dir`) and facts for the child's `info`. The `prepared_input` of both
        jobs holds the paths of their files on this machine."""

    def compose(
        self, parent: Job, children: list[Job], output_dir: Path
    ) -> tuple[list[str], dict[str, Any]]:
        """Once every child succeeded: the parent's outputs (in `output_dir`) and info.
        The children's outputs are on this machine, in their usual folders."""


class Compositions(Protocol):
    """Runs compositions elsewhere than in this process's own task (a fleet's queue)."""

    def bind(self, graphs: JobGraphs) -> None: ...
    async def start(self, tasks: TaskHealth | None = None) -> None: ...
    async def stop(self) -> None: ...
    def request(self, parent_id: str) -> None:
        """Every child succeeded: compose once, on some pod (repeating it is harmless)."""


class JobGraphs:
    def __init__(
        self,
        settings: Settings,
        store: GraphStore,
        runner: JobRunner,
        composers: Mapping[JobKind, Composer],
        *,
        held_by: str = "",
        compositions: Compositions | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._runner = runner
        self._composers = composers
        self._held_by = held_by  # a fleet: this pod's URL, where its compositions are
        self._compositions = compositions
        self._locks: dict[str, asyncio.Lock] = {}
        self._composing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None  # from the change feed
        runner.on_progress(self.child_progress)
        runner.on_part_outputs(self.after_run)
        if compositions is not None:
            compositions.bind(self)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """After the runner recovered its jobs: bring every open parent up to date, and
        follow the parts' status changes from now on."""
        if self._unsubscribe is None:
            self._unsubscribe = self._store.changes.subscribe(self.child_changed, ChangeKind.STATUS)
        await self.reconcile_open()
        if self._compositions is not None:
            await self._compositions.start(self._runner.tasks)

    async def reconcile_open(self) -> None:
        for parent in self._store.open_parents():
            await self.reconcile(parent.id)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._compositions is not None:
            await self._compositions.stop()
        tasks = [*self._composing.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- what the API calls ------------------------------------------------------------

    def submit(self, parent: Job, children: list[Job]) -> tuple[Job, bool]:
        parent, created = self._store.create_graph(parent, children)
        if created:
            self._runner.wake()
        return parent, created

    def add_children(self, parent_id: str, children: list[Job], plan: JobPlan) -> Job:
        """New children of an open parent (an interactive video's next segment)."""

        def change(parent: Job) -> None:
            parent.children = [*parent.children, *(child.id for child in children)]
            parent.plan = plan

        parent = self._store.add_children(parent_id, children, change)
        self._runner.wake()
        self._spawn(self.reconcile(parent_id))
        return parent

    def remove_last_child(self, parent_id: str) -> Job:
        parent = self._store.get(parent_id)
        last = parent.children[-1]

        def change(record: Job) -> None:
            record.children = record.children[:-1]

        parent = self._store.remove_child(parent_id, last, change)
        shutil.rmtree(self._settings.job_dir(last), ignore_errors=True)
        self._spawn(self.reconcile(parent_id))
        return parent

    def update_plan(self, parent_id: str, plan: JobPlan) -> Job:
        parent = self._store.update(parent_id, lambda job: setattr(job, "plan", plan))
        self._spawn(self.reconcile(parent_id))
        return parent

    async def cancel(self, parent_id: str) -> Job:
        """Cancels the parent and every child not finished (idempotent)."""
        parent = self._store.get(parent_id)
        if parent.status.is_terminal:
            return parent
        async with self._lock(parent_id):
            task = self._composing.pop(parent_id, None)
            if task is not None:
                task.cancel()
            self._store.update(parent_id, mark_cancel_requested)
            for child in self._store.children(parent_id):
                if not child.status.is_terminal:
                    await self._runner.cancel(child.id)
            return self._move(self._store.get(parent_id), JobStatus.CANCELED, finish_now)

    async def retry(self, parent_id: str) -> Job:
        """Queues the failed and canceled children again (and the composition, if that
        failed); children that succeeded are kept."""
        parent = self._store.get(parent_id)
        check_retryable(parent)
        async with self._lock(parent_id):
            for child in self._store.children(parent_id):
                if child.status in RETRYABLE:
                    self._store.transition(child.id, JobStatus.QUEUED, reset_for_retry)
            parent = self._move(parent, JobStatus.QUEUED, reset_parent)
        self._runner.wake()
        await self.reconcile(parent_id)
        return self._store.get(parent_id)

    # --- what the store and the runner call (subscribed to them) ------------------------

    def child_changed(self, change: JobChange) -> None:
        """A job's status changed (the store's change feed): its parent's may change."""
        if change.job.parent_id is not None:
            self._spawn(self.reconcile(change.job.parent_id))

    def child_progress(self, child: Job) -> None:
        """A running job's step (the runner's): its parent's summed progress."""
        if child.parent_id is not None:
            self._publish_progress(child)

    async def after_run(
        self, child: Job, inputs: dict[str, Any], output_dir: Path, outputs: list[str]
    ) -> tuple[list[str], dict[str, Any]]:
        """`inputs`: the child's input as it ran (its files' paths on this machine)."""
        parent = self._store.find(child.parent_id or "")
        composer = None if parent is None else self._composers.get(parent.kind)
        if parent is None or composer is None:
            return [], {}
        parent = replace(parent, prepared_input=await self._runner.source.local_inputs(parent))
        child = replace(child, prepared_input=inputs)
        try:
            return await asyncio.to_thread(composer.after_part, parent, child, output_dir, outputs)
        except ServiceError:
            raise
        except (ValueError, OSError) as exc:
            raise ComposeFailed(
                f"preparing this part for the next one failed: {exc}; retry the long video",
            ) from exc

    # --- the reconciliation ------------------------------------------------------------

    async def reconcile(self, parent_id: str) -> None:
        for _ in range(5):
            try:
                await self._reconcile(parent_id)
                return
            except InvalidTransition:  # another pod moved the parent meanwhile: again
                continue
        log.warning("long video not reconciled: its record keeps changing", job_id=parent_id)

    async def _reconcile(self, parent_id: str) -> None:
        async with self._lock(parent_id):
            parent = self._store.find(parent_id)
            if parent is None or parent.status.is_terminal:
                return
            children = self._store.children(parent_id)
            broken = next(
                (c for c in children if c.status in (JobStatus.FAILED, JobStatus.CANCELED)),
                None,
            )
            if broken is not None:
                await self._stop_after(parent, children, broken)
                return
            step, total = _progress(children)
            progress: Any = None  # saved only when it changed (every pod reconciles)
            if (step, total) != (parent.progress_step, parent.progress_total):

                def progress(job: Job) -> None:
                    job.progress_step, job.progress_total = step, total

            statuses = {child.status for child in children}
            if children and statuses == {JobStatus.SUCCEEDED}:
                if parent.plan.get("interactive") and not parent.plan.get("finalize"):
                    self._move(parent, JobStatus.AWAITING_INPUT, progress)
                else:
                    self._move(parent, JobStatus.RUNNING, progress)
                    self._start_composing(parent_id)
            elif not children:
                self._move(parent, JobStatus.AWAITING_INPUT, progress)
            elif statuses & {JobStatus.RUNNING, JobStatus.SUCCEEDED}:
                self._move(parent, JobStatus.RUNNING, progress)
            else:
                self._move(parent, JobStatus.QUEUED, progress)

    async def _stop_after(self, parent: Job, children: list[Job], broken: Job) -> None:
        """A child failed or was canceled: so is the parent; the other children stop."""
        for child in children:
            if not child.status.is_terminal:
                await self._runner.cancel(child.id)
        index = parent.children.index(broken.id) if broken.id in parent.children else -1
        what = f"part {index} ({broken.id})"
        if broken.status is JobStatus.CANCELED:
            self._move(parent, JobStatus.CANCELED, finish_now)
            return
        cause = broken.error or {}
        error = PartFailed(
            f"{what} failed: {cause.get('message', 'no reason recorded')}. The parts that "
            "succeeded are kept; fix the cause, then POST /v1/jobs/{id}/retry to run the "
            "failed ones again".replace("{id}", parent.id),
            part=index,
            part_job_id=broken.id,
            part_error=cause,
        )
        self._move(parent, JobStatus.FAILED, fail_with_dict(error.to_dict()))

    def _start_composing(self, parent_id: str) -> None:
        if self._compositions is not None:
            self._compositions.request(parent_id)
            return
        if parent_id in self._composing:
            return
        task = asyncio.get_running_loop().create_task(self.compose(parent_id))
        self._composing[parent_id] = task
        task.add_done_callback(lambda _: self._composing.pop(parent_id, None))

    async def compose(self, parent_id: str) -> None:
        """Joins the children's outputs into the parent's, and records how that went
        (nothing is done unless the parent is running, its children all done)."""
        parent = self._store.get(parent_id)
        if parent.status is not JobStatus.RUNNING:
            return  # finished meanwhile (a fleet: composed already, or canceled)
        children = self._store.children(parent_id)
        output_dir = self._settings.job_dir(parent_id) / "outputs"
        started = time.monotonic()
        try:
            composer = self._composers[parent.kind]
            # a join's clips, a redo's video: the parent's own files, on this machine
            parent = replace(parent, prepared_input=await self._runner.source.local_inputs(parent))
            await self._local_outputs(children)
            output_dir.mkdir(parents=True, exist_ok=True)
            outputs, info = await asyncio.to_thread(composer.compose, parent, children, output_dir)
            stored = []
            store = OutputStore.for_job(self._settings, parent.storage)
            if store is not None:
                stored = await store.upload(parent, [output_dir / name for name in outputs])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure ends the parent with a reason
            log.error("composing a long video failed", job_id=parent_id, exc_info=exc)
            error = (
                exc
                if isinstance(exc, ServiceError)
                else ComposeFailed(
                    f"joining the parts failed: {exc}; retry with POST /v1/jobs/"
                    f"{parent_id}/retry (the parts are kept), or report this with the "
                    "service logs"
                )
            )
            await self.fail_composition(parent_id, error)
            return
        info["compose_s"] = round(time.monotonic() - started, 3)
        log.info("long video composed", job_id=parent_id, **info)

        def succeed(job: Job) -> None:
            job.finished_at = time.time()
            job.held_by = self._held_by
            job.outputs = outputs
            job.stored_outputs = {obj.name: asdict(obj) for obj in stored}
            job.info = {**job.info, **info}
            job.progress_step = job.progress_total = max(job.progress_total, 1)

        async with self._lock(parent_id):
            current = self._store.get(parent_id)
            if current.status is JobStatus.RUNNING:  # not canceled meanwhile
                with contextlib.suppress(InvalidTransition):  # a fleet: ended elsewhere
                    self._move(current, JobStatus.SUCCEEDED, succeed)

    async def fail_composition(self, parent_id: str, error: ServiceError) -> None:
        async with self._lock(parent_id):
            current = self._store.get(parent_id)
            if current.status is JobStatus.RUNNING:
                with contextlib.suppress(InvalidTransition):  # ended elsewhere meanwhile
                    self._move(current, JobStatus.FAILED, fail_with_dict(error.to_dict()))

    async def _local_outputs(self, children: list[Job]) -> None:
        """Every child's outputs on this machine (a fleet: fetched from the pods' store)."""
        for index, child in enumerate(children):
            missing = await self._runner.source.local_outputs(child.id, child.outputs)
            if missing:
                raise InputMissing(
                    f"part {index} ({child.id}): its outputs {missing} are gone (deleted by "
                    "retention); submit the long video again",
                    source_job=child.id,
                )

    # --- helpers -----------------------------------------------------------------------

    def _move(self, parent: Job, target: JobStatus, change: Any = None) -> Job:
        """The parent to `target` (through `running` where the state machine needs it),
        or only `change` saved when it is there already. Listeners hear of it (a status
        change from the store's feed, a progress change from here)."""
        if parent.status is target:
            if change is None:
                return parent
            updated = self._store.update(parent.id, change, durable=False)
            if (updated.progress_step, updated.progress_total) != (
                parent.progress_step,
                parent.progress_total,
            ):  # progress is published by its writer (a status change by the store)
                self._runner.publish_progress(updated)
            return updated
        if (
            target not in TRANSITIONS[parent.status]
            and JobStatus.RUNNING in TRANSITIONS[parent.status]
        ):
            parent = self._store.transition(parent.id, JobStatus.RUNNING)
        parent = self._store.transition(parent.id, target, change)
        log.info("long video status", job_id=parent.id, status=target.value)
        return parent

    def _publish_progress(self, child: Job) -> None:
        parent = self._store.find(child.parent_id or "")
        if parent is None or parent.status.is_terminal:
            return
        children = [child if c.id == child.id else c for c in self._store.children(parent.id)]
        step, total = _progress(children)
        self._runner.publish_progress(replace(parent, progress_step=step, progress_total=total))

    def _lock(self, parent_id: str) -> asyncio.Lock:
        return self._locks.setdefault(parent_id, asyncio.Lock())

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _progress(children: list[Job]) -> tuple[int, int]:
    done = 0.0
    for child in children:
        if child.status is JobStatus.SUCCEEDED:
            done += 1
        elif child.status is JobStatus.RUNNING and child.progress_total:
            done += min(1.0, child.progress_step / child.progress_total)
    return round(done * UNITS_PER_CHILD), len(children) * UNITS_PER_CHILD
