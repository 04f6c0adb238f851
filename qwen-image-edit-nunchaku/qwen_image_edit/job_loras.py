"""A job's own LoRAs (`input.loras`) on the diffusers pipeline, for that job only.

Fetching: the shared LoRA cache (MODELS_DIR/loras/cache: `hf://` or http(s) sources,
downloaded once, least recently used files evicted beyond LORA_CACHE_GB), run on an
event loop of its own: the worker's threads are not async. The prepare thread fetches
the next job's LoRAs while the GPU runs the current job.

Applying: diffusers' `load_lora_weights` (one adapter per LoRA; its Qwen loader converts
the kohya, lightx2v and ComfyUI layouts), `set_adapters` with the strengths as adapter
weights, and `unload_lora_weights` after the job, so the next job runs the transformer
as loaded (diffusers' documented multi-adapter recipe: docs "Load LoRAs for inference",
`set_adapters(names, adapter_weights=...)`). Lightning's LoRA is fused into the weights
at start and not touched by this. Nunchaku's 4-bit transformer is not a diffusers
`PeftAdapterMixin` model: it takes no LoRA this way, and a job asking for one is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_service.errors import LoraInvalid
from model_service.fetch import SafeHttpClient
from model_service.loras import LoraCache, LoraHandle, parse_lora_source

FIELD = "loras"
CACHE_FOLDER = Path("loras") / "cache"  # under MODELS_DIR, as on the ComfyUI services
MAX_LORA_BYTES = 2 * 2**30  # as the ComfyUI services' (comfy/engine.py)
FETCH_TIMEOUT_S = 1800.0
DEFAULT_CACHE_GB = 20.0  # LORA_CACHE_GB's default
_ADAPTER = "job_lora_{}"
_PREFIX = "transformer."


@dataclass(frozen=True)
class JobLora:
    """One fetched LoRA of a job: its file and the field it came from."""

    path: Path
    strength: float
    field: str
    source: str


class LoraFetcher:
    """The LoRA cache on a private event loop (a daemon thread)."""

    def __init__(self, models_dir: Path, options: Mapping[str, Any]) -> None:
        self._loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._loop.run_forever, name="worker-loras", daemon=True)
        thread.start()
        self._thread = thread
        networks = [ipaddress.ip_network(n) for n in options.get("fetch_allow_networks") or []]
        gb = float(options.get("lora_cache_gb") or DEFAULT_CACHE_GB)
        root = Path(options.get("lora_cache_dir") or Path(models_dir) / CACHE_FOLDER)

        async def build() -> LoraCache:
            return LoraCache(
                root,
                max_bytes=int(gb * 1e9),
                http=self._http,
                hf_endpoint=options.get("hf_endpoint"),
                max_file_bytes=MAX_LORA_BYTES,
                # read here, not passed in the worker's options (they are not secret)
                civitai_token=os.environ.get("CIVITAI_TOKEN") or None,
            )

        self._http = SafeHttpClient(
            allow_networks=networks, max_bytes=MAX_LORA_BYTES, timeout_s=FETCH_TIMEOUT_S
        )
        self._cache = self._call(build())

    def close(self) -> None:
        """Close the HTTP client and stop the loop (the worker process just exits)."""
        self._call(self._http.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def prefetch(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Download what is missing (the next job's LoRAs, while the GPU is busy)."""
        with self.hold(entries):
            pass

    @contextlib.contextmanager
    def hold(self, entries: Sequence[Mapping[str, Any]]) -> Iterator[list[JobLora]]:
        """The job's LoRA files, pinned in the cache (not evicted) until the block ends.
        Raises `LoraInvalid` / `LoraUnavailable` naming `input.loras[i].source`."""

        async def acquire() -> list[LoraHandle]:
            handles: list[LoraHandle] = []
            try:
                for index, entry in enumerate(entries):
                    where = f"input.{FIELD}[{index}].source"
                    source = parse_lora_source(str(entry["source"]), field=where)
                    handles.append(await self._cache.acquire(source, field=where))
            except BaseException:
                for handle in handles:
                    handle.release()
                raise
            return handles

        handles: list[LoraHandle] = self._call(acquire())
        try:
            yield [
                JobLora(
                    handle.path,
                    float(entry.get("strength", 1.0)),
                    f"input.{FIELD}[{index}].source",
                    str(entry["source"]),
                )
                for index, (handle, entry) in enumerate(zip(handles, entries, strict=True))
            ]
        finally:
            for handle in handles:  # the pins are the loop's: released there
                self._loop.call_soon_threadsafe(handle.release)


@contextlib.contextmanager
def applied(pipe: Any, loras: Sequence[JobLora]) -> Iterator[None]:
    """The job's LoRAs as diffusers adapters at their strengths for the block; unloaded
    after it (also when the job fails or is canceled)."""
    if not loras:
        yield
        return
    names: list[str] = []
    try:
        for index, lora in enumerate(loras):
            state_dict = transformer_keys(pipe.lora_state_dict(str(lora.path)))
            problem = misfit(pipe.transformer, state_dict)
            if problem is not None:
                raise LoraInvalid(
                    f"{lora.field}: the LoRA {lora.source} does not fit this Qwen-Image "
                    f"transformer: {problem}; use a LoRA trained for Qwen-Image(-Edit)",
                    field=lora.field,
                )
            name = _ADAPTER.format(index)
            with warnings.catch_warnings():  # PEFT warns of a second adapter: wanted
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                pipe.load_lora_weights(state_dict, adapter_name=name)
            if name not in pipe.get_list_adapters().get("transformer", []):
                raise LoraInvalid(
                    f"{lora.field}: diffusers loaded nothing of the LoRA {lora.source}; give a "
                    "Qwen-Image LoRA in the diffusers, kohya or ComfyUI layout",
                    field=lora.field,
                )
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[lora.strength for lora in loras])
        yield
    finally:
        if names:
            pipe.unload_lora_weights()


def transformer_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A plain PEFT state dict (`transformer_blocks.0.attn.to_q.lora_A.weight`, what
    `get_peft_model_state_dict` of the transformer saves) gets the `transformer.` prefix
    the pipeline's loader looks for; without it diffusers loads nothing and only warns."""
    if any(key.startswith(_PREFIX) for key in state_dict):
        return state_dict
    return {f"{_PREFIX}{key}": value for key, value in state_dict.items()}


def misfit(transformer: Any, state_dict: Mapping[str, Any]) -> str | None:
    """Why the LoRA does not fit `transformer` (a pair naming no layer of it, or of
    another shape), or None: diffusers would load such a LoRA partly and only log."""
    layers = dict(transformer.named_modules())
    downs = [key for key in state_dict if key.endswith(".lora_A.weight")]
    if not downs:
        return "it holds no LoRA weights diffusers can read"
    for key in downs:
        name = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        up = state_dict.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            return f"{key} has no lora_B pair"
        shape = (up.shape[0], state_dict[key].shape[1])
        layer = layers.get(name)
        if layer is None or tuple(getattr(layer, "weight", torch.empty(0)).shape) != shape:
            found = "no such layer" if layer is None else f"layer is {tuple(layer.weight.shape)}"
            return f"{name} is {shape} in the LoRA, {found} in the model"
    return None
