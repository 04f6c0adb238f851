"""What a service folder declares; the shared library builds the whole service from it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from fastapi import APIRouter

    from model_service.comfy.engine import ComfyServiceSpec
    from model_service.longvideo.spec import LongVideoSpec


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # the service folder's name, e.g. "qwen-image-edit-nunchaku"
    title: str
    version: str
    description: str
    default_port: int
    input_model: type[BaseModel]
    # the engine: a predictor ("package.module:Class", imported only in the worker
    # process), or the workflows of an embedded ComfyUI
    predictor: str | None
    min_vram_gb: float  # for the full profile; 0 means no GPU needed
    # settings -> options handed to the worker's predictor (WorkerConfig.options)
    worker_options: Callable[[Any], dict[str, Any]] = field(default=lambda settings: {})
    # (validated input, settings) -> None; raise InvalidInput for service-level rules
    check_input: Callable[[Any, Any], None] = field(default=lambda data, settings: None)
    # (validated input, the loaded model's facts: Engine.info, {} until it is loaded) ->
    # None; raise InvalidInput for what the model as loaded cannot do (a 422 at submit,
    # not a failed job)
    check_against_model: Callable[[Any, Mapping[str, Any]], None] = field(
        default=lambda data, info: None
    )
    # (api.state.ServiceState) -> more routers; `Any`: the state is built from this spec
    extra_routes: Callable[[Any], list[APIRouter]] = field(default=lambda state: [])
    comfy: ComfyServiceSpec | None = None
    # image-to-video services: long videos (chains of segments, travel between images)
    long_video: LongVideoSpec | None = None

    def __post_init__(self) -> None:
        if (self.predictor is None) == (self.comfy is None):
            raise ValueError(f"{self.name}: give exactly one of `predictor` or `comfy`")
