"""Turning a long-video request into a parent job and its parts (child jobs).

Every part is a job of the service itself, checked by the service's input model like
any other, so a bad segment is a 422 naming it before anything is stored.

- chain: segment k starts from the last frame of segment k-1 (`inputs_from`: the file
  `next_start.png` that segment k-1 leaves, its lossless last frame, colour-corrected),
  so it depends on it. Segment k's seed is its own, or the request's seed + k.
- travel: legs do not depend on each other (they may run at once); leg i starts at image
  i and, on first-last-frame services, ends at image i+1.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from typing import Any

from model_service.decode_budget import RequestImages
from model_service.errors import InvalidInput, WrongJobState
from model_service.jobs.graph import JobGraphs
from model_service.jobs.record import Job, JobKind, JobPlan
from model_service.jobs.retry import RETRYABLE
from model_service.jobs.status import JobStatus
from model_service.longvideo.spec import MAX_PARTS, LongVideoSpec
from model_service.settings import Settings
from model_service.staging import InputStaging
from model_service.submit import JobSubmitter, new_job_id, shorten_ref
from model_service.webhooks import DEFAULT_WEBHOOK_EVENTS

NEXT_START = "next_start.png"  # a chain segment's last frame, as the next one's start
WANT_LAST_FRAME = "_last_frame"  # see model_service.comfy.engine


class LongVideoSubmitter:
    def __init__(
        self,
        spec: LongVideoSpec,
        settings: Settings,
        submitter: JobSubmitter,
        graphs: JobGraphs,
    ) -> None:
        self._spec = spec
        self._settings = settings
        self._submitter = submitter
        self._graphs = graphs

    # --- chains ------------------------------------------------------------------------

    async def chain(
        self, body: dict[str, Any], job_id: str | None, base_url: str
    ) -> tuple[Job, bool]:
        request = {
            k: body[k]
            for k in ("input", "segments", "interactive", "colour_correction", "colour_strength")
        }
        events = body.get("webhook_events")
        if events is None and body["interactive"]:  # it waits for the client: say so
            events = [*DEFAULT_WEBHOOK_EVENTS, JobStatus.AWAITING_INPUT.value]
        options = await self._submitter.check_options(
            {"chain": request}, job_id, body.get("webhook"), events, body.get("storage")
        )
        if options.existing is not None:
            return options.existing, False
        image_field = self._spec.image_field
        base = dict(body["input"])
        start_ref = base.get(image_field)
        if not start_ref:
            raise InvalidInput(
                f"input.{image_field}: a chain starts from an image; give one",
                field=f"input.{image_field}",
            )
        if self._spec.end_image_field and base.get(self._spec.end_image_field):
            raise InvalidInput(
                f"input.{self._spec.end_image_field}: a chain's segments are image-to-video; "
                "use POST /v1/travels to go from image to image",
                field=f"input.{self._spec.end_image_field}",
            )
        base_seed = base["seed"] = seed_of(base)
        parent_id = job_id or new_job_id()
        segments = body["segments"]
        # every segment checked before any file is fetched
        for index, segment in enumerate(segments):
            self._segment_values(base, segment, index, f"segments[{index}]", "(start image)")
        staging = InputStaging(self._settings, parent_id)
        start_path = staging.path(f"{image_field}.png")
        try:
            await self._submitter.materialize(
                start_ref, "image", f"input.{image_field}", start_path
            )
            await self._submitter.share_inputs(parent_id, staging.dir)
            checked = self._submitter.validate({**base, image_field: "(start image)"})
            base.update(await asyncio.to_thread(self._image_size, checked, str(start_path)))
            plan: JobPlan = {
                "interactive": bool(body["interactive"]),
                "finalize": False,
                "colour_correction": bool(body["colour_correction"]),
                "colour_strength": float(body["colour_strength"]),
                "base": {**base, image_field: None},
                "start_image": staging.final_path(start_path),
                "next_index": 0,
            }
            parent = Job(
                id=parent_id,
                status=JobStatus.QUEUED,
                kind=JobKind.CHAIN,
                input=public(body),
                prepared_input={image_field: plan["start_image"]},
                seed=base_seed,
                request_hash=options.request_hash,
                webhook=body.get("webhook"),
                webhook_events=options.events,
                base_url=base_url,
                storage=options.storage,
                plan=plan,
            )
            children = self._new_segments(parent, None, segments)
            parent.children = [child.id for child in children]
            plan["next_index"] = len(children)  # child ids stay unique after deletions
            return await self.submit_graph(parent, children, staging)
        finally:
            staging.discard()

    def add_segments(self, parent: Job, segments: list[dict[str, Any]]) -> Job:
        parent_id = parent.id
        if parent.kind != JobKind.CHAIN or not parent.plan.get("interactive"):
            raise WrongJobState(
                f"job {parent_id} is not an interactive chain; segments can be added only to "
                'one created with "interactive": true',
                job_id=parent_id,
            )
        if parent.status.is_terminal:
            hint = "retry it first" if parent.status in RETRYABLE else "reopen it first"
            raise WrongJobState(f"chain {parent_id} is {parent.status}; {hint}", job_id=parent_id)
        if len(parent.children) + len(segments) > MAX_PARTS:
            raise InvalidInput(f"a chain holds at most {MAX_PARTS} segments", field="segments")
        previous = parent.children[-1] if parent.children else None
        children = self._new_segments(parent, previous, segments)
        plan: JobPlan = {
            **parent.plan,
            "finalize": False,
            "next_index": parent.plan["next_index"] + len(children),
        }
        return self._graphs.add_children(parent_id, children, plan)

    def _new_segments(
        self, parent: Job, previous: str | None, segments: list[dict[str, Any]]
    ) -> list[Job]:
        """Child jobs for `segments`, each after the one before (`previous`: the chain's
        last segment so far, or None: the first starts from the chain's start image)."""
        image_field = self._spec.image_field
        base = parent.plan["base"]
        children = []
        first = parent.plan["next_index"]
        for offset, segment in enumerate(segments):
            index = first + offset
            where = f"segments[{offset}]"
            source = "(start image)" if previous is None else f"(last frame of {previous})"
            values = self._segment_values(base, segment, index, where, source)
            child_id = f"{parent.id}.{index}"
            prepared = {**values, WANT_LAST_FRAME: True}
            inputs_from: dict[str, str] = {}
            if previous is None:
                prepared[image_field] = parent.plan["start_image"]
            else:
                inputs_from[image_field] = f"{previous}/{NEXT_START}"
            child = part_job(parent.id, index, values, prepared, parent.base_url)
            child.depends_on = [] if previous is None else [previous]
            child.inputs_from = inputs_from
            children.append(child)
            previous = child_id
        return children

    def _image_size(self, checked: Mapping[str, Any], image: str) -> dict[str, Any]:
        """Width and height for every part when the request gave none: the service's
        size-from-image rule applied once, to the first image (parts of one video must
        share a size; each part's own start image would round differently)."""
        rule = self._spec.size_from_image
        if rule is None or checked.get("width") is not None:
            return {}
        return rule({**checked, self._spec.image_field: image})

    def _segment_values(
        self, base: dict[str, Any], segment: dict[str, Any], index: int, where: str, source: str
    ) -> dict[str, Any]:
        own = {k: v for k, v in segment.items() if v is not None}
        values = {**base, **own, self._spec.image_field: source}
        if "seed" not in own:
            values["seed"] = (int(base["seed"]) + index) % 2**32
        return self._submitter.validate(values, prefix=where)

    # --- travel ------------------------------------------------------------------------

    async def travel(
        self, body: dict[str, Any], job_id: str | None, base_url: str
    ) -> tuple[Job, bool]:
        request = {k: body[k] for k in ("input", "images", "prompts", "overlap")}
        options = await self._submitter.check_options(
            {"travel": request},
            job_id,
            body.get("webhook"),
            body.get("webhook_events"),
            body.get("storage"),
        )
        if options.existing is not None:
            return options.existing, False
        start_field, end_field = self._spec.image_field, self._spec.end_image_field
        images: list[str] = body["images"]
        legs = len(images) - 1 if end_field else len(images)
        prompts = body.get("prompts")
        if prompts is not None and len(prompts) != legs:
            raise InvalidInput(
                f"prompts: {len(prompts)} given for {legs} legs ({len(images)} images); give "
                "one per leg, or none to use input.prompt for every leg",
                field="prompts",
            )
        base = {**body["input"], start_field: None}
        if end_field:
            base[end_field] = None
        base_seed = seed_of(base)
        overlap = int(body["overlap"])
        leg_values = []
        for leg in range(legs):
            values = {**base, start_field: f"(image {leg})", "seed": (base_seed + leg) % 2**32}
            if end_field:
                values[end_field] = f"(image {leg + 1})"
            if prompts is not None:
                values["prompt"] = prompts[leg]
            checked = self._submitter.validate(values, prefix=f"legs[{leg}]")
            frames = int(checked[self._spec.frames_field])
            if legs > 1 and 2 * overlap > frames:
                raise InvalidInput(
                    f"overlap: {overlap} frames at each end of a leg of {frames} frames; use "
                    f"at most {frames // 2}",
                    field="overlap",
                )
            leg_values.append(checked)
        parent_id = job_id or new_job_id()
        staging = InputStaging(self._settings, parent_id)
        try:
            paths, decoded = [], RequestImages()
            for index, ref in enumerate(images):
                path = staging.path(f"image_{index}.png")
                field = f"images[{index}]"
                await self._submitter.materialize(ref, "image", field, path, decoded)
                paths.append(staging.final_path(path))
            first = str(staging.path("image_0.png"))
            size = await asyncio.to_thread(self._image_size, leg_values[0], first)
            leg_values = [{**values, **size} for values in leg_values]
            await self._submitter.share_inputs(parent_id, staging.dir)
            parent = Job(
                id=parent_id,
                status=JobStatus.QUEUED,
                kind=JobKind.TRAVEL,
                input=public(body),
                prepared_input={"images": paths},
                seed=base_seed,
                request_hash=options.request_hash,
                webhook=body.get("webhook"),
                webhook_events=options.events,
                base_url=base_url,
                storage=options.storage,
                plan={"overlap": overlap},
            )
            children = []
            for leg, values in enumerate(leg_values):
                prepared = {**values, start_field: paths[leg]}
                if end_field:
                    prepared[end_field] = paths[leg + 1]
                children.append(part_job(parent_id, leg, values, prepared, base_url))
            parent.children = [child.id for child in children]
            return await self.submit_graph(parent, children, staging)
        finally:
            staging.discard()

    async def submit_graph(
        self, parent: Job, children: list[Job], staging: InputStaging
    ) -> tuple[Job, bool]:
        """The graph stored; the request's files become the parent's if it won the id."""
        job, created = self._graphs.submit(parent, children)
        if created:
            staging.commit()
            # a fleet: the winner's files again, over any a losing request shared
            await self._submitter.share_inputs(parent.id, staging.final)
        return job, created


def part_job(
    parent_id: str, index: int, values: dict[str, Any], prepared: dict[str, Any], base_url: str
) -> Job:
    """Part `index` of a long video: a queued job of the service, `values` its input."""
    return Job(
        id=f"{parent_id}.{index}",
        status=JobStatus.QUEUED,
        input=values,
        prepared_input=prepared,
        seed=values.get("seed"),
        request_hash=f"part of {parent_id}",
        base_url=base_url,
        parent_id=parent_id,
        plan={"index": index},
    )


def public(value: Any) -> Any:
    """The request as shown on the job: long data URIs shortened, webhook options left
    out (the job shows them elsewhere)."""
    if isinstance(value, str):
        return shorten_ref(value)
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, dict):
        hidden = ("webhook", "webhook_events", "storage")
        return {k: public(v) for k, v in value.items() if k not in hidden}
    return value


def seed_of(values: dict[str, Any]) -> int:
    """The request's seed, or a random one (each part then gets seed + its index)."""
    seed = values.get("seed")
    return int(seed) if seed is not None else secrets.randbelow(2**32)
