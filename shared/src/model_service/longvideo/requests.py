"""The request bodies of long videos, built from the service's own input model (so
/docs shows the service's fields, and every part is checked as a job of the service)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from model_service.longvideo.spec import MAX_PARTS, LongVideoSpec
from model_service.media_refs import ImageRef, VideoRef
from model_service.storage import StorageRequest
from model_service.webhooks import WEBHOOK_EVENTS

_INPUT_HELP = (
    "The service's input (as for POST /v1/jobs): the settings every part shares. A part's "
    "own fields override it."
)


def _options() -> dict[str, Any]:
    return {
        "webhook": (
            str | None,
            Field(None, max_length=2048, description="https URL called on events."),
        ),
        "webhook_events": (
            list[str] | None,
            Field(None, description=f"Any of {list(WEBHOOK_EVENTS)}; default: the terminal ones."),
        ),
        "storage": (
            StorageRequest | None,
            Field(None, description="Upload the final video to this bucket/prefix."),
        ),
    }


def segment_model(spec: LongVideoSpec, input_model: type[BaseModel]) -> type[BaseModel]:
    """One segment of a chain: the fields it may set for itself, all optional."""
    fields: dict[str, Any] = {}
    for name in spec.segment_fields:
        info = input_model.model_fields.get(name)
        if info is not None:
            fields[name] = (
                info.annotation | None,  # type: ignore[operator]
                Field(None, description=info.description),
            )
    model: type[BaseModel] = create_model(
        "ChainSegment", __config__=ConfigDict(extra="forbid"), **fields
    )
    return model


def chain_request_model(spec: LongVideoSpec, input_model: type[BaseModel]) -> type[BaseModel]:
    segment = segment_model(spec, input_model)
    model: type[BaseModel] = create_model(
        "ChainRequest",
        __config__=ConfigDict(extra="forbid"),
        input=(
            dict[str, Any],
            Field(
                description=_INPUT_HELP + f" `{spec.image_field}` (the first frame) is required."
            ),
        ),
        segments=(
            list[segment],  # type: ignore[valid-type]
            Field(
                min_length=1,
                max_length=MAX_PARTS,
                description="The segments, in order; each starts from the last frame of the "
                "one before. Seeds differ per segment unless given (the input's seed + index).",
            ),
        ),
        interactive=(
            bool,
            Field(
                False,
                description="Wait in `awaiting_input` after the last segment: add segments, "
                "delete the last one, or finalize.",
            ),
        ),
        colour_correction=(
            bool,
            Field(
                True,
                description="Match each segment's colours to the start image (stops drift "
                "from building up over the chain).",
            ),
        ),
        colour_strength=(float, Field(1.0, ge=0.0, le=1.0, description="0 to 1.")),
        **_options(),
    )
    return model


def travel_request_model(spec: LongVideoSpec, input_model: type[BaseModel]) -> type[BaseModel]:
    legs = (
        "N-1 legs, leg i going from image i to image i+1 (first-last-frame)"
        if spec.end_image_field
        else "N legs, leg i starting at image i (image-to-video)"
    )
    frames = spec.frames_field
    model: type[BaseModel] = create_model(
        "TravelRequest",
        __config__=ConfigDict(extra="forbid"),
        input=(dict[str, Any], Field(description=_INPUT_HELP + f" `{frames}`: frames per leg.")),
        images=(
            list[ImageRef],
            Field(min_length=2, max_length=MAX_PARTS, description=f"N images: {legs}."),
        ),
        prompts=(
            list[str] | None,
            Field(None, description="One prompt per leg; default: input.prompt for every leg."),
        ),
        overlap=(
            int,
            Field(
                4,
                ge=0,
                le=64,
                description="Frames at the end of a leg cross-faded with the start of the next.",
            ),
        ),
        **_options(),
    )
    return model


_SHARED_INPUT = (
    "The service's input (as for POST /v1/jobs) every new part shares: prompt, LoRAs, "
    "seed, ... Size, frame rate and frame count come from the video(s); the start and "
    "end images from their frames."
)


def join_request_model(spec: LongVideoSpec) -> type[BaseModel]:
    model: type[BaseModel] = create_model(
        "JoinRequest",
        __config__=ConfigDict(extra="forbid"),
        input=(dict[str, Any], Field(default_factory=dict, description=_SHARED_INPUT)),
        clips=(
            list[VideoRef],
            Field(
                min_length=2,
                max_length=MAX_PARTS,
                description="The clips, in order: one size, one whole frame rate.",
            ),
        ),
        bridge_frames=(
            int,
            Field(
                15,
                ge=1,
                le=240,
                description="New frames between two clips (a first-last-frame part from "
                "one clip's last frame to the next one's first). The video: sum of the "
                "clips' frames + (clips - 1) x bridge_frames.",
            ),
        ),
        prompt=(
            str | None,
            Field(
                None, max_length=4000, description="Every bridge's prompt (default input.prompt)."
            ),
        ),
        prompts=(
            list[str] | None,
            Field(None, description="One prompt per bridge instead (clips - 1)."),
        ),
        **_options(),
    )
    return model


def redo_request_model(spec: LongVideoSpec) -> type[BaseModel]:
    model: type[BaseModel] = create_model(
        "RedoRequest",
        __config__=ConfigDict(extra="forbid"),
        input=(dict[str, Any], Field(default_factory=dict, description=_SHARED_INPUT)),
        video=(VideoRef, Field(description="The video: one whole frame rate.")),
        start_frame=(
            int,
            Field(
                ge=1,
                description="First frame of the stretch made again (from 0; the "
                "frame before it stays, and the new stretch starts from it).",
            ),
        ),
        end_frame=(
            int,
            Field(
                ge=1,
                description="Last frame of the stretch (included; at most the "
                "video's frames - 2: the frame after it stays too).",
            ),
        ),
        prompt=(
            str | None,
            Field(
                None, max_length=4000, description="What the stretch shows (default input.prompt)."
            ),
        ),
        **_options(),
    )
    return model


def segments_added_model(spec: LongVideoSpec, input_model: type[BaseModel]) -> type[BaseModel]:
    """Body of POST /v1/chains/{id}/segments: the next segments of an interactive chain."""
    segment = segment_model(spec, input_model)
    model: type[BaseModel] = create_model(
        "SegmentsAdded",
        __config__=ConfigDict(extra="forbid"),
        segments=(list[segment], Field(min_length=1, max_length=MAX_PARTS)),  # type: ignore[valid-type]
    )
    return model
