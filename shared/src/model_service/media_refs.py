"""Input field types that refer to a file: an https URL, a data URI or an upload id.

A service's input model marks its file fields with these types; before a job is
queued the API resolves every marked field (fetch, decode, check) into a local file,
and the worker receives that file's path in place of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

MediaKind = Literal["image", "audio", "video"]


@dataclass(frozen=True)
class MediaField:
    kind: MediaKind


_REF_HELP = (
    "An https URL, a data URI (data:image/png;base64,...) or the id of a file sent to "
    "POST /v1/uploads."
)

ImageRef = Annotated[
    str,
    MediaField("image"),
    Field(min_length=1, max_length=120_000_000, description="Image: " + _REF_HELP),
]


AudioRef = Annotated[
    str,
    MediaField("audio"),
    Field(
        min_length=1,
        max_length=120_000_000,
        description="Audio (wav, mp3, m4a, flac, ogg): " + _REF_HELP,
    ),
]


VideoRef = Annotated[
    str,
    MediaField("video"),
    Field(
        min_length=1,
        max_length=120_000_000,
        description="Video (mp4, mov, webm, mkv): " + _REF_HELP,
    ),
]


def media_fields(model: type[BaseModel]) -> dict[str, MediaKind]:
    """Names of the model's fields that hold media references (single or list)."""
    found: dict[str, MediaKind] = {}
    for name, info in model.model_fields.items():
        for meta in _all_metadata(info.annotation, info.metadata):
            if isinstance(meta, MediaField):
                found[name] = meta.kind
    return found


def _all_metadata(annotation: Any, metadata: list[Any]) -> list[Any]:
    """Metadata of a field and of the Annotated types nested in list[...] / X | None."""
    out = list(metadata)
    stack = [annotation]
    while stack:
        current = stack.pop()
        out.extend(getattr(current, "__metadata__", ()))
        stack.extend(getattr(current, "__args__", ()))
        origin = getattr(current, "__origin__", None)
        if origin is not None and origin is not current:
            stack.append(origin)
    return out
