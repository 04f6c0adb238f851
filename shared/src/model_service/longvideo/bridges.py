"""Joins and redos: long videos made around the caller's own videos (the Headless-Wan2GP
worker's `join_clips` and `inpaint_frames`), on first-last-frame services only.

- join (`POST /v1/joins`): clips A, B, C, ...; between each two a bridge, a part going
  from A's last frame to B's first (first-last-frame); the video is A, the bridge's inner
  frames, B, ...: sum(clip frames) + (clips - 1) x bridge_frames frames.
- redo (`POST /v1/redos`): frames start_frame..end_frame of a video made again, by a
  part going from the frame before the stretch to the frame after it; the video keeps
  its frame count, frame rate and audio.

A part's frame count follows the model (Wan's VAE: 4n+1): b new frames are generated as
the smallest valid count n >= b + 2 (its first and last frame are the frames it starts
and ends on, already in the video) and the b inner frames picked evenly from the n - 2
(`inner_frames`): all of them when n = b + 2, else at most 3 frames skipped, spread out.

Services with no last-frame conditioning (FastWan) refuse both with a 422: a cross-fade
would not be what the caller asked for (new frames that carry one clip into the next).
The parts are generated at the clips' own size and frame rate, so the clips must be one
size the model makes, at one whole frame rate.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import av
from PIL import Image
from pydantic import BaseModel

from model_service.errors import InvalidInput
from model_service.jobs.record import Job, JobKind, JobPlan
from model_service.jobs.status import JobStatus
from model_service.longvideo.spec import LongVideoSpec
from model_service.longvideo.submit import LongVideoSubmitter, part_job, public, seed_of
from model_service.settings import Settings
from model_service.staging import InputStaging
from model_service.submit import JobSubmitter, RequestOptions, new_job_id
from model_service.video.stitch import VideoFacts, probe


def inner_frames(generated: int, wanted: int) -> list[int]:
    """Which frames of a part of `generated` frames (its first and last are the frames
    around it) stand for the `wanted` new ones: evenly spread over 1 .. generated - 2."""
    if generated < wanted + 2:
        raise ValueError(f"a part of {generated} frames cannot hold {wanted} inner frames")
    return [round((j + 1) * (generated - 1) / (wanted + 1)) for j in range(wanted)]


class BridgeSubmitter:
    def __init__(
        self,
        spec: LongVideoSpec,
        settings: Settings,
        input_model: type[BaseModel],
        submitter: JobSubmitter,
        long_videos: LongVideoSubmitter,
    ) -> None:
        self._spec = spec
        self._settings = settings
        self._fields = input_model.model_fields
        self._submitter = submitter
        self._long_videos = long_videos

    # --- joins -------------------------------------------------------------------------

    async def join(
        self, body: dict[str, Any], job_id: str | None, base_url: str
    ) -> tuple[Job, bool]:
        self._first_last_frame("clips", "joining clips")
        clip_refs: list[str] = body["clips"]
        bridges = len(clip_refs) - 1
        prompts = self._prompts(body, bridges)
        request = {k: body[k] for k in ("input", "clips", "bridge_frames", "prompt", "prompts")}
        options = await self._submitter.check_options(
            {"join": request},
            job_id,
            body.get("webhook"),
            body.get("webhook_events"),
            body.get("storage"),
        )
        if options.existing is not None:
            return options.existing, False
        wanted = int(body["bridge_frames"])
        generated = self._spec.frames_at_least(wanted + 2)
        base = self._base(body)
        parent_id = job_id or new_job_id()
        staging = InputStaging(self._settings, parent_id)
        try:
            clips, facts = [], []
            for index, ref in enumerate(clip_refs):
                field = f"clips[{index}]"
                path = await self._submitter.materialize(
                    ref, "video", field, staging.path(f"clip_{index}")
                )
                facts.append(await asyncio.to_thread(_facts, path, field))
                clips.append(path)
            _same_shape(facts)
            children = []
            for bridge in range(bridges):
                where = f"bridges[{bridge}]"
                start, end = (
                    staging.path(f"bridge_{bridge}_start.png"),
                    staging.path(f"bridge_{bridge}_end.png"),
                )
                before, after = f"clips[{bridge}]", f"clips[{bridge + 1}]"
                last = facts[bridge].frames - 1
                await asyncio.to_thread(_save_frame, clips[bridge], last, start, before)
                await asyncio.to_thread(_save_frame, clips[bridge + 1], 0, end, after)
                values = self._part_values(
                    base,
                    facts[0],
                    generated,
                    prompts[bridge],
                    bridge,
                    where,
                    f"(last frame of clip {bridge})",
                    f"(first frame of clip {bridge + 1})",
                )
                children.append(
                    self._part(parent_id, base_url, bridge, values, start, end, staging)
                )
            await self._submitter.share_inputs(parent_id, staging.dir)
            plan: JobPlan = {"new_frames": wanted, "generated_frames": generated}
            parent = self._parent(
                parent_id,
                JobKind.JOIN,
                body,
                {"clips": [staging.final_path(path) for path in clips]},
                base,
                options,
                base_url,
                plan,
            )
            parent.children = [child.id for child in children]
            return await self._long_videos.submit_graph(parent, children, staging)
        finally:
            staging.discard()

    # --- redos -------------------------------------------------------------------------

    async def redo(
        self, body: dict[str, Any], job_id: str | None, base_url: str
    ) -> tuple[Job, bool]:
        self._first_last_frame("video", "redoing a stretch")
        first, last = int(body["start_frame"]), int(body["end_frame"])
        if last < first:
            raise InvalidInput(
                f"end_frame ({last}) is before start_frame ({first}); the stretch runs from "
                "start_frame to end_frame, both included",
                field="end_frame",
            )
        request = {k: body[k] for k in ("input", "video", "start_frame", "end_frame", "prompt")}
        options = await self._submitter.check_options(
            {"redo": request},
            job_id,
            body.get("webhook"),
            body.get("webhook_events"),
            body.get("storage"),
        )
        if options.existing is not None:
            return options.existing, False
        wanted = last - first + 1
        generated = self._spec.frames_at_least(wanted + 2)
        base = self._base(body)
        parent_id = job_id or new_job_id()
        staging = InputStaging(self._settings, parent_id)
        try:
            video = await self._submitter.materialize(
                body["video"], "video", "video", staging.path("video")
            )
            facts = await asyncio.to_thread(_facts, video, "video")
            if last > facts.frames - 2:
                raise InvalidInput(
                    f"end_frame: {last}, but the video has {facts.frames} frames (0 to "
                    f"{facts.frames - 1}) and the stretch needs a frame after it: at most "
                    f"{facts.frames - 2}",
                    field="end_frame",
                )
            before, after = staging.path("before.png"), staging.path("after.png")
            await asyncio.to_thread(_save_frame, video, first - 1, before, "video")
            await asyncio.to_thread(_save_frame, video, last + 1, after, "video")
            values = self._part_values(
                base,
                facts,
                generated,
                body.get("prompt"),
                0,
                "stretch",
                f"(frame {first - 1})",
                f"(frame {last + 1})",
            )
            child = self._part(parent_id, base_url, 0, values, before, after, staging)
            await self._submitter.share_inputs(parent_id, staging.dir)
            plan: JobPlan = {
                "new_frames": wanted,
                "generated_frames": generated,
                "start_frame": first,
                "end_frame": last,
            }
            prepared = {"video": staging.final_path(video)}
            parent = self._parent(
                parent_id, JobKind.REDO, body, prepared, base, options, base_url, plan
            )
            parent.children = [child.id]
            return await self._long_videos.submit_graph(parent, [child], staging)
        finally:
            staging.discard()

    # --- shared ------------------------------------------------------------------------

    def _first_last_frame(self, field: str, what: str) -> None:
        if self._spec.end_image_field is None:
            raise InvalidInput(
                f"{field}: {what} needs a model that can end a video on a given frame "
                "(first-last-frame); this one cannot, and a cross-fade would make no new "
                "frames. Use the Wan2.2-14B service, or POST /v1/travels for a cross-faded "
                "video through images",
                field=field,
            )

    def _prompts(self, body: dict[str, Any], bridges: int) -> list[str | None]:
        prompts: list[str] | None = body.get("prompts")
        if prompts is None:
            return [body.get("prompt")] * bridges
        if body.get("prompt") is not None:
            raise InvalidInput(
                "prompt and prompts: give one prompt for every bridge, or one per bridge, not both",
                field="prompts",
            )
        if len(prompts) != bridges:
            raise InvalidInput(
                f"prompts: {len(prompts)} given for {bridges} bridges ({bridges + 1} clips); "
                "give one per bridge",
                field="prompts",
            )
        return list(prompts)

    def _base(self, body: dict[str, Any]) -> dict[str, Any]:
        base = dict(body["input"])
        for name in (self._spec.image_field, self._spec.end_image_field):
            if name and base.get(name):
                raise InvalidInput(
                    f"input.{name}: the frames a part starts and ends on come from the "
                    "video(s); leave it out",
                    field=f"input.{name}",
                )
        base["seed"] = seed_of(base)
        return base

    def _part_values(
        self,
        base: dict[str, Any],
        facts: VideoFacts,
        generated: int,
        prompt: str | None,
        index: int,
        where: str,
        start: str,
        end: str,
    ) -> dict[str, Any]:
        """A part's input: the request's, at the video's size and frame rate, going from
        `start` to `end` (placeholders until the files are staged)."""
        assert self._spec.end_image_field is not None
        fields = self._fields
        values = {
            **base,
            self._spec.image_field: start,
            self._spec.end_image_field: end,
            self._spec.frames_field: generated,
            "seed": (int(base["seed"]) + index) % 2**32,
        }
        if "width" in fields:
            values["width"], values["height"] = facts.width, facts.height
        if "fps" in fields:
            values["fps"] = int(facts.fps)
        if prompt is not None:
            values["prompt"] = prompt
        try:
            return self._submitter.validate(values, prefix=where)
        except InvalidInput as exc:
            exc.message = (
                f"{exc.message} (the part is made at the video's {facts.width}x"
                f"{facts.height}, {facts.fps} fps, {generated} frames: scale or re-time "
                "the video to what the model makes if that is the cause)"
            )
            raise

    def _part(
        self,
        parent_id: str,
        base_url: str,
        index: int,
        values: dict[str, Any],
        start: Path,
        end: Path,
        staging: InputStaging,
    ) -> Job:
        assert self._spec.end_image_field is not None
        prepared = {
            **values,
            self._spec.image_field: staging.final_path(start),
            self._spec.end_image_field: staging.final_path(end),
        }
        return part_job(parent_id, index, values, prepared, base_url)

    def _parent(
        self,
        parent_id: str,
        kind: JobKind,
        body: dict[str, Any],
        prepared: dict[str, Any],
        base: dict[str, Any],
        options: RequestOptions,
        base_url: str,
        plan: JobPlan,
    ) -> Job:
        return Job(
            id=parent_id,
            status=JobStatus.QUEUED,
            kind=kind,
            input=public(body),
            prepared_input=prepared,
            seed=int(base["seed"]),
            request_hash=options.request_hash,
            webhook=body.get("webhook"),
            webhook_events=options.events,
            base_url=base_url,
            storage=options.storage,
            plan=plan,
        )


def _facts(path: Path, field: str) -> VideoFacts:
    try:
        facts = probe(path)
    except (ValueError, av.FFmpegError) as exc:
        raise InvalidInput(f"{field}: not a readable video ({exc})", field=field) from None
    if facts.fps.denominator != 1:
        raise InvalidInput(
            f"{field}: runs at {float(facts.fps):.3f} fps; the model's parts are made at a "
            "whole frame rate: re-time the video (e.g. to 16, 24 or 30 fps)",
            field=field,
        )
    if facts.frames < 2:
        raise InvalidInput(f"{field}: holds {facts.frames} frame(s); give a video", field=field)
    return facts


def _same_shape(facts: list[VideoFacts]) -> None:
    first = facts[0]
    for index, other in enumerate(facts[1:], start=1):
        if (other.width, other.height, other.fps) != (first.width, first.height, first.fps):
            raise InvalidInput(
                f"clips[{index}]: {other.width}x{other.height} at {other.fps} fps, but "
                f"clips[0] is {first.width}x{first.height} at {first.fps} fps; the clips of "
                "a join must share size and frame rate",
                field=f"clips[{index}]",
            )


def _save_frame(video: Path, index: int, target: Path, field: str) -> None:
    """Frame `index` of `video` (from 0) as a PNG."""
    try:
        with av.open(str(video)) as container:
            for number, frame in enumerate(container.decode(video=0)):
                if number == index:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    image = Image.fromarray(frame.to_ndarray(format="rgb24"))
                    image.save(target, format="PNG")
                    return
    except av.FFmpegError as exc:
        raise InvalidInput(f"{field}: cannot decode the video ({exc})", field=field) from None
    raise InvalidInput(
        f"{field}: decodes to fewer frames than its header says (no frame {index}); re-encode it",
        field=field,
    )
