"""The web console (`GET /`: public like /health, the page asks for the API key) and the
description of the service's input it builds its form from (in `GET /v1/service`)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from model_service.errors import NotFound
from model_service.media_refs import MediaKind, media_fields
from model_service.service import ServiceSpec

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
# the page's files (no build step); always revalidated, so an upgrade is seen at once
CONSOLE_FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
_NO_CACHE = {"cache-control": "no-cache"}


def is_console_path(path: str) -> bool:
    """The page and its files: served without an API key."""
    return path == "/" or path.startswith("/console/")


class LongVideoInfo(BaseModel):
    chains: bool = Field(description="POST /v1/chains: segments, each from the last frame.")
    travels: bool = Field(description="POST /v1/travels: a video through N images.")
    joins: bool = Field(
        description="POST /v1/joins and /v1/redos: new frames between your clips, or in "
        "place of a stretch of your video (first-last-frame models only)."
    )
    image_field: str = Field(description="The input field with a part's first frame.")
    end_image_field: str | None = Field(description="The field with a part's last frame.")
    frames_field: str = Field(description="The input field with a part's frame count.")
    segment_fields: list[str] = Field(description="Fields a chain's segment may set itself.")


@dataclass(frozen=True)
class InputDescription:
    input_schema: dict[str, Any]  # JSON schema of a job's `input`
    media: dict[str, MediaKind]  # the fields that take a file (or a list of files)
    long_video: LongVideoInfo | None


def describe_input(spec: ServiceSpec) -> InputDescription:
    model = spec.input_model
    long_video = None
    if spec.long_video is not None:  # the app then has the /v1/chains and /v1/travels routes
        lv = spec.long_video
        long_video = LongVideoInfo(
            chains=True,
            travels=True,
            joins=lv.end_image_field is not None,
            image_field=lv.image_field,
            end_image_field=lv.end_image_field,
            frames_field=lv.frames_field,
            segment_fields=[name for name in lv.segment_fields if name in model.model_fields],
        )
    return InputDescription(model.model_json_schema(), media_fields(model), long_video)


def build_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def console_page() -> FileResponse:
        return FileResponse(
            CONSOLE_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE
        )

    @router.get("/console/{name}")
    async def console_file(name: str) -> FileResponse:
        media_type = CONSOLE_FILES.get(name)
        if media_type is None:  # only the listed files: no path ever comes from the URL
            raise NotFound(f"no console file {name!r}")
        return FileResponse(CONSOLE_DIR / name, media_type=media_type, headers=_NO_CACHE)

    return router
