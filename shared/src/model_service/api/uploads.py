"""`POST /v1/uploads`: send a file once, refer to it by id in job inputs."""

import secrets
import time
from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from pydantic import BaseModel

from model_service.api.state import ServiceState
from model_service.errors import PayloadTooLarge
from model_service.jobs.store import Upload
from model_service.submit import UPLOAD_PREFIX

_CHUNK = 1 << 20


class UploadView(BaseModel):
    id: str
    filename: str
    content_type: str | None
    size: int


def build_router(state: ServiceState) -> APIRouter:
    router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
    limit = state.settings.max_upload_bytes

    @router.post("", status_code=201, response_model=UploadView, summary="Upload a file")
    async def upload(file: Annotated[UploadFile, File(description="The file")]) -> UploadView:
        upload_id = UPLOAD_PREFIX + secrets.token_hex(12)
        folder = state.settings.uploads_dir
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / upload_id  # the caller's file name never reaches a path
        size = 0
        try:
            with target.open("wb") as out:
                while chunk := await file.read(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(
                            f"upload is larger than MAX_UPLOAD_BYTES={limit}; send a smaller "
                            "file or give a URL instead",
                            limit=limit,
                        )
                    out.write(chunk)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        record = Upload(
            id=upload_id,
            filename=(file.filename or "file")[:255],
            content_type=file.content_type,
            size=size,
            created_at=time.time(),
        )
        await state.runner.source.save_upload(upload_id, target)
        state.store.add_upload(record)
        return UploadView(
            id=record.id, filename=record.filename, content_type=record.content_type, size=size
        )

    return router
