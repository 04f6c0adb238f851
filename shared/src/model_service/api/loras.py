"""`GET /v1/loras`: the LoRA files this service holds in its cache (model_service.loras)."""

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, Field

from model_service.api.state import ServiceState
from model_service.loras import cache_dir, list_cached


class LoraView(BaseModel):
    name: str = Field(description="The file as ComfyUI's `loras` folder lists it.")
    source: str | None = Field(
        description="Where it came from (`hf://...`, or the URL without its query); null "
        "for a file cached by an older version."
    )
    size_bytes: int
    sha256: str | None
    last_used: str = Field(description="When a job last used it (ISO 8601, UTC).")
    downloaded_at: str | None = Field(description="When it was downloaded (ISO 8601, UTC).")


class LorasView(BaseModel):
    loras: list[LoraView] = Field(description="Most recently used first.")
    total_bytes: int
    max_bytes: int = Field(
        description="The cache's cap (LORA_CACHE_GB); unused LoRAs beyond it are deleted, "
        "least recently used first."
    )


def build_router(state: ServiceState) -> APIRouter:
    router = APIRouter(tags=["service"])
    root = cache_dir(state.settings)
    max_bytes = int(state.settings.lora_cache_gb * 1e9)

    @router.get(
        "/v1/loras",
        response_model=LorasView,
        summary="The LoRAs cached on this service (name, source, size, sha256, last use); "
        "a job naming one of these sources starts without downloading it",
    )
    async def loras() -> LorasView:
        cached = await asyncio.to_thread(list_cached, root)
        return LorasView(
            loras=[LoraView(**vars(lora)) for lora in cached],
            total_bytes=sum(lora.size_bytes for lora in cached),
            max_bytes=max_bytes,
        )

    return router
