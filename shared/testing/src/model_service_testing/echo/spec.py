"""The echo service's spec and input (imported by the API process: no torch)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from model_service.errors import InvalidInput
from model_service.media_refs import ImageRef
from model_service.service import ServiceSpec

if TYPE_CHECKING:
    from model_service.api.state import ServiceState

Behaviour = Literal["ok", "crash", "hang", "error", "oom", "cuda_error", "exit", "kill_pod"]


class EchoInput(BaseModel):
    text: str = Field("hello", max_length=200)
    image: ImageRef | None = None
    steps: int = Field(2, ge=1, le=1000)
    step_s: float = Field(0.0, ge=0, le=30, description="Sleep per step.")
    behaviour: Behaviour = Field("ok", description="What the worker does at step 1.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


def test_routes(state: ServiceState) -> list[APIRouter]:
    """`GET /echo/fault`: a bug on purpose (what a 500 logs, how it is answered);
    `GET /echo/modules`: the modules the API process has imported."""
    router = APIRouter(include_in_schema=False)

    @router.get("/echo/modules")
    async def modules() -> list[str]:
        return sorted(sys.modules)

    @router.get("/echo/fault")
    async def fault() -> None:
        settings = state.settings  # a local the logged traceback must not show
        raise RuntimeError(f"a bug on purpose in {settings.mode} mode")

    return [router]


def _check_against_model(data: EchoInput, info: Mapping[str, Any]) -> None:
    """What the loaded model cannot do: the text its worker says it refuses."""
    if info.get("refused_text") is not None and data.text == info["refused_text"]:
        raise InvalidInput(
            "input.text: the loaded echo model refuses this text", field="input.text"
        )


SPEC = ServiceSpec(
    name="echo",
    title="Echo (test fixture)",
    version="0.0.1",
    description="Inverts an image or draws one; fails on request.",
    default_port=8099,
    input_model=EchoInput,
    predictor="model_service_testing.echo.predictor:EchoPredictor",
    min_vram_gb=0,
    extra_routes=test_routes,
    check_against_model=_check_against_model,
)
