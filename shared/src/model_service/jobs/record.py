"""The job record as stored, and the event a job emits when it changes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, TypedDict

from model_service.jobs.status import JobStatus


class JobKind(StrEnum):
    JOB = "job"  # a plain job: the engine runs it
    CHAIN = "chain"  # a long video: segments, each from the last frame of the one before
    TRAVEL = "travel"  # a long video: legs between images
    JOIN = "join"  # the user's clips with a bridge between each two
    REDO = "redo"  # the user's video with a stretch of it made again


class JobPlan(TypedDict, total=False):
    """A long video's options, or a part's place in it (stored as this JSON object)."""

    index: int  # a part's, from 0
    # a chain's
    interactive: bool  # it waits for the client's next segments (awaiting_input)
    finalize: bool  # an interactive chain's client asked for the final video
    colour_correction: bool
    colour_strength: float
    base: dict[str, Any]  # the input every segment starts from (its image left out)
    start_image: str  # the chain's start image, a path on this machine
    next_index: int  # the next segment's index (ids stay unique after deletions)
    # a travel's
    overlap: int  # frames cross-faded between legs
    # a join's and a redo's: the new frames wanted, and the part's own count (the model's
    # frame count rule: it is picked down to the wanted ones)
    new_frames: int
    generated_frames: int
    # a redo's: the stretch made again, first and last frame (from 0)
    start_frame: int
    end_frame: int


@dataclass
class Job:
    id: str
    status: JobStatus
    input: dict[str, Any]  # as the caller sent it, long data URIs shortened
    prepared_input: dict[str, Any]  # what the worker gets: media fields are local paths
    seed: int | None
    request_hash: str
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress_step: int = 0
    progress_total: int = 0
    outputs: list[str] = field(default_factory=list)  # file names under the job's outputs
    outputs_expired: bool = False
    error: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # facts the model reported
    attempts: int = 0  # times the job was started
    cancel_requested: bool = False
    webhook: str | None = None
    webhook_events: list[str] = field(default_factory=list)
    base_url: str = ""  # where the job was submitted; output links in webhooks use it
    storage: dict[str, Any] | None = None  # the request's bucket/prefix/presign_s override
    stored_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> object
    # job graphs (long videos): a parent (a chain, a travel) runs nothing itself; its
    # children are plain jobs that run after the jobs in `depends_on` succeeded
    kind: JobKind = JobKind.JOB
    parent_id: str | None = None
    children: list[str] = field(default_factory=list)  # a parent's, in order
    depends_on: list[str] = field(default_factory=list)
    # input field -> "<job id>/<output name>": a file another job makes, found at run time
    inputs_from: dict[str, str] = field(default_factory=dict)
    plan: JobPlan = field(default_factory=JobPlan)  # a long video's options; a part's place
    held_by: str = ""  # a fleet: URL of the pod that ran the job and holds its files

    @property
    def is_parent(self) -> bool:
        return self.kind != JobKind.JOB

    def to_row(self) -> dict[str, Any]:
        """The fields as they are (JSON values already): no deep copy, it is serialised
        at once."""
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["status"] = self.status.value
        data["kind"] = str(self.kind)
        return data

    def state_row(self) -> dict[str, Any]:
        """`to_row` without the request's fields: what a change after `create` saves."""
        data = {name: getattr(self, name) for name in STATE_FIELDS}
        data["status"] = self.status.value
        data["kind"] = str(self.kind)
        return data

    def request_row(self) -> dict[str, Any]:
        """The request's fields, written once with the new job."""
        return {name: getattr(self, name) for name in REQUEST_FIELDS}

    @classmethod
    def from_parts(cls, state: dict[str, Any], request: dict[str, Any] | None) -> Job:
        """A job from its state and its request as the stores keep them apart (an older
        store's state holds both, and its request is None)."""
        return cls.from_row({**state, **(request or {})})

    @classmethod
    def from_row(cls, data: dict[str, Any]) -> Job:
        data = dict(data)
        data["status"] = JobStatus(data["status"])
        if "kind" in data:  # rows from before long videos have none
            data["kind"] = JobKind(data["kind"])
        return cls(**data)


@dataclass(frozen=True)
class JobEvent:
    """A change worth telling listeners about (server-sent events, webhooks)."""

    job_id: str
    kind: str  # "status" or "progress"
    job: Job


_FIELD_NAMES = tuple(f.name for f in fields(Job))
# What the request fixed, never changed after the job is created (a custom workflow's
# graph can be 100 KB, twice): the stores keep it apart from the state, so a change
# (claim, progress, the end) reads and writes the small state alone.
REQUEST_FIELDS = (
    "input",
    "prepared_input",
    "request_hash",
    "webhook",
    "webhook_events",
    "base_url",
    "storage",
    "inputs_from",
)
STATE_FIELDS = tuple(name for name in _FIELD_NAMES if name not in REQUEST_FIELDS)
