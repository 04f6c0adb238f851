"""A stand-in ComfyUI server for tests: ComfyUI 0.33's HTTP and websocket protocol, no torch.

Run it as its own process, so that a crash is a real crash:

    python -m model_service_testing.comfy_standin --port 8188 --base-dir /tmp/comfy \\
        [--object-info snapshot.json[.gz]] [--models-json m.json]

It validates graphs against a real `/object_info` snapshot like ComfyUI does (by default the
pinned ComfyUI's, vendored beside this module: `snapshot.OBJECT_INFO`), runs one
prompt at a time in queue order, and sends the real websocket sequence (`status`,
`execution_start`, `execution_cached`, `executing`, `progress`, `progress_state`,
`executed`, `execution_success` | `execution_error` | `execution_interrupted`, then
`executing` with `node: null`; binary image frames as ComfyUI's `send_image` makes them
for a client without `supports_preview_metadata`), including ComfyUI's race:
`execution_success` goes out before the history entry is written (widen it with
`history_delay_s`).

Weight-free core nodes run for real (see `nodes`); every other known node is a
fake that passes placeholders and emits sampler progress. Test knobs (constructor or
`POST /standin/config`): `step_delay_s`, `slow_nodes` {class: seconds},
`fail_nodes` {class or node id: {exception_type, message}}, `crash_nodes` [class or node
id] (the process exits with `os._exit(1)` when one starts), `history_delay_s`, `cache`,
`drift` (colour drift of frames made from a start image, at the last frame), `previews`
(samplers send a JPEG latent-preview frame per step).
`GET /standin/stats` lists the `/free`, `/interrupt` and `/history/{id}` calls it received,
the prompts it accepted and the nodes each one run took from the cache;
`POST /standin/drop_websockets` closes every websocket (a network blip).

Written from the protocol as observed (ComfyUI 0.33.0's `server.py` and `execution.py`
behaviour); no ComfyUI code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import io
import json
import logging
import mimetypes
import os
import platform
import signal
import struct
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from aiohttp import WSMsgType, web
from PIL import Image

from model_service.comfy.workflow import is_link
from model_service_testing.comfy_standin.graph import Catalog, Validator, expand_inputs
from model_service_testing.comfy_standin.nodes import (
    ALWAYS_CHANGED,
    Dirs,
    InjectedFailure,
    NodeContext,
    NodeInterrupted,
    NodeResult,
    run_node,
)
from model_service_testing.comfy_standin.snapshot import OBJECT_INFO
from model_service_testing.process import free_port

log = logging.getLogger("comfy.standin")

COMFYUI_VERSION = "0.33.0"
MAX_HISTORY = 10000
SENSITIVE_KEYS = ("api_key_comfy_org", "auth_token_comfy_org")
OOM_TYPES = {"torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"}
OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a "
    "large number."
)
DEFAULT_OOM_MESSAGE = (
    "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
    "Currently allocated     : 77.21 GiB\nRequested               : 4.00 GiB"
)


# --- configuration -------------------------------------------------------------------


@dataclass
class FailSpec:
    exception_type: str = "RuntimeError"
    message: str = "stand-in failure"


@dataclass
class Knobs:
    """Fault injection and timing; every field can be changed at run time."""

    step_delay_s: float = 0.0
    slow_nodes: dict[str, float] = field(default_factory=dict)
    fail_nodes: dict[str, FailSpec] = field(default_factory=dict)
    crash_nodes: list[str] = field(default_factory=list)
    history_delay_s: float = 0.0
    cache: bool = True
    drift: float = 0.0  # colour drift of frames made from a start image (standin_nodes)
    previews: bool = False  # latent previews from samplers (binary frames)

    def update(self, data: dict[str, Any]) -> None:
        if data.get("reset"):
            fresh = Knobs()
            for name in fresh.__dataclass_fields__:
                setattr(self, name, getattr(fresh, name))
        for key, value in data.items():
            if key == "fail_nodes":
                self.fail_nodes = {k: FailSpec(**v) for k, v in value.items()}
            elif key in ("step_delay_s", "history_delay_s", "drift"):
                setattr(self, key, float(value))
            elif key in ("slow_nodes", "crash_nodes", "cache", "previews"):
                setattr(self, key, value)
            elif key != "reset":
                raise ValueError(f"unknown stand-in knob {key!r}")


@dataclass
class StandinConfig:
    base_dir: Path
    object_info: Path = OBJECT_INFO
    models: dict[str, list[str]] = field(default_factory=dict)
    video_encoder: str = "auto"  # auto | ffmpeg | pyav
    knobs: Knobs = field(default_factory=Knobs)


@dataclass(order=True)
class QueueItem:
    number: float
    seq: int
    prompt_id: str = field(compare=False)
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)
    sensitive: dict[str, Any] = field(compare=False, default_factory=dict)

    def public(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- the server ----------------------------------------------------------------------


class Standin:
    """One ComfyUI-like server: queue, executor, history, websocket clients."""

    def __init__(self, config: StandinConfig) -> None:
        self.config = config
        self.knobs = config.knobs
        base = config.base_dir
        self.dirs = Dirs(base / "input", base / "output", base / "temp")
        self.models_dir = base / "models"
        for path in (self.dirs.input, self.dirs.output, self.dirs.temp, self.models_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog.load(config.object_info, self.model_files, self.input_files)
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.pending: list[QueueItem] = []
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.cache: dict[str, CacheEntry] = {}
        self.flags: dict[str, Any] = {}
        self.stats: dict[str, list[Any]] = {
            "free": [],
            "interrupt": [],
            "history_reads": [],
            "prompts": [],  # every graph it accepted, as received
            "cached": [],  # [prompt id, the node ids it took from the cache], per prompt run
        }
        self.number = 0
        self.task_counter = 0
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.interrupted = False
        self.wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    # --- files ---------------------------------------------------------------------

    def model_files(self, folder: str) -> list[str]:
        found = set(self.config.models.get(folder, []))
        root = self.models_dir / folder
        if root.is_dir():
            found |= {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        return sorted(found)

    def input_files(self) -> list[str]:
        root = self.dirs.input
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def input_exists(self, name: str) -> bool:
        for kind in ("input", "output", "temp"):
            suffix = f" [{kind}]"
            if name.endswith(suffix):
                folder = self.dirs.by_type(kind)
                return folder is not None and (folder / name[: -len(suffix)]).is_file()
        return (self.dirs.input / name).is_file()

    # --- app -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=100 * 1024 * 1024)
        routes = [
            web.get("/", self.root),
            web.get("/ws", self.websocket),
            web.get("/prompt", self.get_prompt),
            web.post("/prompt", self.post_prompt),
            web.get("/queue", self.get_queue),
            web.post("/queue", self.post_queue),
            web.post("/interrupt", self.post_interrupt),
            web.post("/free", self.post_free),
            web.get("/history", self.get_history),
            web.get("/history/{prompt_id}", self.get_history_item),
            web.post("/history", self.post_history),
            web.get("/view", self.view),
            web.post("/upload/image", self.upload_image),
            web.get("/object_info", self.object_info),
            web.get("/object_info/{node_class}", self.object_info_node),
            web.get("/models", self.models),
            web.get("/models/{folder}", self.models_folder),
            web.get("/system_stats", self.system_stats),
        ]
        app.add_routes([web.route(r.method, "/api" + r.path, r.handler) for r in routes])
        app.add_routes(routes)
        app.add_routes(
            [
                web.get("/standin/config", self.get_config),
                web.post("/standin/config", self.post_config),
                web.get("/standin/stats", self.get_stats),
                web.post("/standin/drop_websockets", self.drop_websockets),
            ]
        )
        app.on_startup.append(self._start_worker)
        app.on_cleanup.append(self._stop_worker)
        return app

    async def _start_worker(self, app: web.Application) -> None:
        self.wake = asyncio.Event()
        self._worker = asyncio.create_task(self._work(), name="standin-worker")

    async def _stop_worker(self, app: web.Application) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for ws in list(self.sockets.values()):
            await ws.close()

    # --- messages ------------------------------------------------------------------

    async def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        targets = (
            list(self.sockets.values())
            if sid is None
            else [self.sockets[sid]]
            if sid in self.sockets
            else []
        )
        for ws in targets:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json({"type": event, "data": data})

    async def send_bytes(self, frame: bytes, sid: str | None) -> None:
        ws = self.sockets.get(sid or "")
        if ws is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(frame)

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self.pending) + len(self.running)}}

    async def queue_updated(self) -> None:
        await self.send("status", {"status": self.queue_info()})

    # --- routes --------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(
            text="<html><body>ComfyUI stand-in</body></html>", content_type="text/html"
        )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
        self.sockets.pop(sid, None)  # a new socket with the same id replaces the old one
        self.sockets[sid] = ws
        try:
            await self.send("status", {"status": self.queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._client_message(sid, msg.data)
        finally:
            if self.sockets.get(sid) is ws:
                self.sockets.pop(sid, None)
        return ws

    async def _client_message(self, sid: str, text: str) -> None:
        with contextlib.suppress(ValueError):
            data = json.loads(text)
            if isinstance(data, dict) and data.get("type") == "feature_flags":
                await self.send("feature_flags", {"supports_preview_metadata": False}, sid)

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue_info())

    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "number" in body:
            number = float(body["number"])
        else:
            number = -self.number if body.get("front") else self.number
            self.number += 1
        if "prompt" not in body:
            return _bad_request("no_prompt", "No prompt provided", "No prompt provided")
        prompt_id = _client_prompt_id(body.get("prompt_id"))
        if prompt_id is None:
            details = (
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one"
            )
            return _bad_request("invalid_prompt_id", "prompt_id must be a valid UUID", details)
        result = Validator(self.catalog, self.input_exists).validate_prompt(
            body["prompt"], body.get("partial_execution_targets")
        )
        if not result.ok:
            log.warning("invalid prompt: %s", result.error)
            return web.json_response(
                {"error": result.error, "node_errors": result.node_errors}, status=400
            )
        self.stats["prompts"].append(body["prompt"])
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        sensitive = {k: extra.pop(k) for k in SENSITIVE_KEYS if k in extra}
        extra["create_time"] = _now_ms()
        item = QueueItem(
            number, self.task_counter, prompt_id, result.prompt, extra, result.outputs, sensitive
        )
        self.task_counter += 1
        heapq.heappush(self.pending, item)
        await self.queue_updated()
        self.wake.set()
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}
        )

    async def get_queue(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "queue_running": [item.public() for item in self.running.values()],
                "queue_pending": [item.public() for item in self.pending],
            }
        )

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self.pending.clear()
            await self.queue_updated()
        for prompt_id in body.get("delete", []):
            kept = [item for item in self.pending if item.prompt_id != prompt_id]
            if len(kept) != len(self.pending):
                self.pending = kept
                heapq.heapify(self.pending)
                await self.queue_updated()
        return web.Response()

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        running = [item.prompt_id for item in self.running.values()]
        applied = not prompt_id or prompt_id in running
        if applied:
            self.interrupted = True
        self.stats["interrupt"].append(
            {"prompt_id": prompt_id, "applied": applied, "running": running}
        )
        return web.Response()

    async def post_free(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.stats["free"].append(body)
        for flag in ("unload_models", "free_memory"):
            if body.get(flag):
                self.flags[flag] = body[flag]
        self.wake.set()
        return web.Response()

    async def get_history(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query.get("offset", -1))
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        items = list(self.history.items())[max(offset, 0) :]
        if max_items is not None:
            items = items[:max_items]
        return web.json_response(dict(items))

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        self.stats["history_reads"].append(prompt_id)
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self.history.clear()
        for prompt_id in body.get("delete", []):
            self.history.pop(prompt_id, None)
        return web.Response()

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, folder = self._annotated(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        folder = folder or self.dirs.by_type(query.get("type", "output"))
        if folder is None:
            return web.Response(status=400)
        if "subfolder" in query:
            inner = (folder / query["subfolder"]).resolve()
            if os.path.commonpath((str(inner), str(folder.resolve()))) != str(folder.resolve()):
                return web.Response(status=403)
            folder = inner
        path = folder / os.path.basename(filename)
        if not path.is_file():
            return web.Response(status=404)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {
            "Content-Disposition": f'filename="{path.name}"',
            "Content-Type": content_type,
            "X-Content-Type-Options": "nosniff",
        }
        return web.FileResponse(path, headers=headers)

    def _annotated(self, name: str) -> tuple[str, Path | None]:
        for kind in ("input", "output", "temp"):
            if name.endswith(f" [{kind}]"):
                return name[: -len(kind) - 3], self.dirs.by_type(kind)
        return name, None

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        folder = self.dirs.by_type(kind)
        if folder is None:
            return web.Response(status=400)
        subfolder = str(post.get("subfolder", ""))
        overwrite = str(post.get("overwrite")) in ("true", "1")
        name = _store_upload(folder, subfolder, image.filename, image.file.read(), overwrite)
        if name is None:
            return web.Response(status=400)
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response({name: self.catalog.info(name) for name in self.catalog.names()})

    async def object_info_node(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        return web.json_response({name: self.catalog.info(name)} if name in self.catalog else {})

    async def models(self, request: web.Request) -> web.Response:
        folders = {folder for folder in self.config.models} | {
            p.name for p in self.models_dir.iterdir() if p.is_dir()
        }
        return web.json_response(sorted(folders))

    async def models_folder(self, request: web.Request) -> web.Response:
        return web.json_response(self.model_files(request.match_info["folder"]))

    async def system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "system": {
                    "os": sys.platform,
                    "ram_total": 0,
                    "ram_free": 0,
                    "comfyui_version": COMFYUI_VERSION,
                    "python_version": sys.version,
                    "pytorch_version": "none (ComfyUI stand-in)",
                    "embedded_python": False,
                    "argv": sys.argv,
                    "standin": True,
                },
                "devices": [
                    {
                        "name": f"cpu ({platform.machine()})",
                        "type": "cpu",
                        "index": None,
                        "vram_total": 0,
                        "vram_free": 0,
                        "torch_vram_total": 0,
                        "torch_vram_free": 0,
                    }
                ],
            }
        )

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.knobs))

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            self.knobs.update(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.knobs))

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def drop_websockets(self, request: web.Request) -> web.Response:
        """Close every websocket (a network blip): clients must reconnect or poll."""
        sockets = list(self.sockets.values())
        for ws in sockets:
            await ws.close()
        return web.json_response({"closed": len(sockets)})

    # --- the worker ----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                self._apply_flags()
                await self.wake.wait()
                continue
            item = heapq.heappop(self.pending)
            task_id = self.task_counter
            self.task_counter += 1
            self.running[task_id] = item
            await self.queue_updated()
            try:
                await self._run_item(task_id, item)
            except Exception:
                log.exception("stand-in worker failed on prompt %s", item.prompt_id)
                self.running.pop(task_id, None)
            self._apply_flags()

    def _apply_flags(self) -> None:
        if self.flags.get("free_memory"):
            self.cache.clear()
        self.flags.clear()

    async def _run_item(self, task_id: int, item: QueueItem) -> None:
        self.client_id = item.extra_data.get("client_id")
        self.interrupted = False
        execution = Execution(self, item)
        await execution.run()
        if self.knobs.history_delay_s > 0:  # widen ComfyUI's race: success is out, history not yet
            await asyncio.sleep(self.knobs.history_delay_s)
        self.running.pop(task_id, None)
        if len(self.history) > MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        self.history[item.prompt_id] = execution.history_entry()
        await self.queue_updated()
        if self.client_id is not None:
            await self.send(
                "executing", {"node": None, "prompt_id": item.prompt_id}, self.client_id
            )
        self.last_node_id = None


def _client_prompt_id(value: Any) -> str | None:
    if value is None:
        return str(uuid.uuid4())
    try:
        canonical = str(uuid.UUID(str(value)))
    except ValueError:
        return None
    return canonical if canonical == value else None


def _bad_request(kind: str, message: str, details: str) -> web.Response:
    error = {"type": kind, "message": message, "details": details, "extra_info": {}}
    return web.json_response({"error": error, "node_errors": {}}, status=400)


def _store_upload(
    folder: Path, subfolder: str, filename: str, data: bytes, overwrite: bool
) -> str | None:
    """Write an upload where ComfyUI would; None if the name leaves the folder."""
    target = (folder / os.path.normpath(subfolder)).resolve()
    path = (target / filename).resolve()
    if os.path.commonpath((str(folder.resolve()), str(path))) != str(folder.resolve()):
        return None
    target.mkdir(parents=True, exist_ok=True)
    path = _upload_path(path, data, overwrite)
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path.name


def _upload_path(path: Path, data: bytes, overwrite: bool) -> Path:
    """ComfyUI's rule: same name and same bytes is reused, same name else gets ` (n)`."""
    if overwrite:
        return path
    stem, suffix, n = path.stem, path.suffix, 1
    while path.exists() and path.read_bytes() != data:
        path = path.with_name(f"{stem} ({n}){suffix}")
        n += 1
    return path


# --- one prompt ----------------------------------------------------------------------


class Execution:
    """Runs one queued prompt and keeps the status messages its history entry records."""

    def __init__(self, server: Standin, item: QueueItem) -> None:
        self.server = server
        self.item = item
        self.prompt = item.prompt
        self.prompt_id = item.prompt_id
        self.client_id = server.client_id
        self.messages: list[list[Any]] = []
        self.values: dict[str, tuple[Any, ...]] = {}
        self.ui: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []
        self.cached: list[str] = []
        self.progress_nodes: dict[str, dict[str, Any]] = {}
        self.success = False
        self._signatures: dict[str, str] = {}

    async def message(self, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        data = {**data, "timestamp": _now_ms()}
        self.messages.append([event, data])
        if self.client_id is not None or broadcast:
            await self.server.send(event, data, self.client_id)

    async def to_client(self, event: str, data: dict[str, Any]) -> None:
        if self.client_id is not None:
            await self.server.send(event, data, self.client_id)

    async def run(self) -> None:
        await self.message("execution_start", {"prompt_id": self.prompt_id})
        use_cache = self.server.knobs.cache
        self.cached = [
            n for n in self.prompt if use_cache and self._signature(n) in self.server.cache
        ]
        self.server.stats["cached"].append([self.prompt_id, list(self.cached)])
        await self.message("execution_cached", {"nodes": self.cached, "prompt_id": self.prompt_id})
        for node_id in self._order():
            if not await self._step(node_id):
                return
        self.success = True
        await self.message("execution_success", {"prompt_id": self.prompt_id})

    def history_entry(self) -> dict[str, Any]:
        return {
            "prompt": self.item.public(),
            "outputs": {node: ui["output"] for node, ui in self.ui.items()},
            "status": {
                "status_str": "success" if self.success else "error",
                "completed": self.success,
                "messages": self.messages,
            },
            "meta": {node: ui["meta"] for node, ui in self.ui.items()},
        }

    def _order(self) -> list[str]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for value in self.prompt[node_id].get("inputs", {}).values():
                if is_link(value):
                    visit(value[0])
            order.append(node_id)

        for output in self.item.outputs:
            visit(output)
        return order

    def _signature(self, node_id: str) -> str:
        if node_id not in self._signatures:
            node = self.prompt[node_id]
            inputs = {
                k: ["link", self._signature(v[0]), v[1]] if is_link(v) else v
                for k, v in sorted(node.get("inputs", {}).items())
            }
            volatile = uuid.uuid4().hex if node["class_type"] in ALWAYS_CHANGED else None
            text = json.dumps(
                [node["class_type"], inputs, self._file_stamp(node), volatile],
                sort_keys=True,
                default=str,
            )
            self._signatures[node_id] = hashlib.sha256(text.encode()).hexdigest()
        return self._signatures[node_id]

    def _file_stamp(self, node: dict[str, Any]) -> list[int] | None:
        """Like a loader's IS_CHANGED: a changed input file is a new signature."""
        name = node.get("inputs", {}).get("image") or node.get("inputs", {}).get("file")
        if not isinstance(name, str):
            return None
        path = self.server.dirs.input / name
        return [path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else None

    async def _step(self, node_id: str) -> bool:
        if node_id in self.cached:
            await self._reuse(node_id)
            return True
        try:
            result = await self._execute(node_id)
        except NodeInterrupted:
            await self._interrupted(node_id)
            return False
        except Exception as exc:
            await self._failed(node_id, exc)
            return False
        self.values[node_id] = result.outputs
        self.executed.append(node_id)
        self.server.cache[self._signature(node_id)] = CacheEntry(result.outputs, result.ui)
        if result.ui:
            await self._executed(node_id, result.ui)
        await self._finish_progress(node_id)
        return True

    async def _reuse(self, node_id: str) -> None:
        """A cached node: ComfyUI visits only cached *output* nodes (their UI again and a
        finished progress_state); a cached input is taken from the cache without a message."""
        entry = self.server.cache[self._signature(node_id)]
        self.values[node_id] = entry.outputs
        if node_id not in self.item.outputs:
            return
        if entry.ui:
            await self._executed(node_id, entry.ui)
        await self._finish_progress(node_id)

    async def _executed(self, node_id: str, ui: dict[str, Any]) -> None:
        meta = {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }
        self.ui[node_id] = {"meta": meta, "output": ui}
        data = {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": self.prompt_id}
        await self.to_client("executed", data)

    async def _execute(self, node_id: str) -> NodeResult:
        node = self.prompt[node_id]
        class_type = node["class_type"]
        raw = node.get("inputs", {})
        sections, _ = expand_inputs(self.server.catalog.inputs(class_type), raw)
        declared = set(sections["required"]) | set(sections["optional"])
        inputs = {  # as ComfyUI: a widget value the schema does not declare is dropped
            k: self.values[v[0]][v[1]] if is_link(v) else v
            for k, v in raw.items()
            if is_link(v) or k in declared
        }
        self.server.last_node_id = node_id
        await self._start_progress(node_id)
        await self.to_client(
            "executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id}
        )
        knobs = self.server.knobs
        if node_id in knobs.crash_nodes or class_type in knobs.crash_nodes:
            log.error("stand-in: crashing at node %s (%s) as configured", node_id, class_type)
            os._exit(1)
        await asyncio.sleep(0)  # /interrupt and /queue get in between nodes, as in ComfyUI
        self._check_interrupt()
        fail = knobs.fail_nodes.get(node_id) or knobs.fail_nodes.get(class_type)
        if fail is not None:
            message = (
                DEFAULT_OOM_MESSAGE
                if fail.exception_type in OOM_TYPES and not fail.message
                else fail.message
            )
            raise InjectedFailure(fail.exception_type, message)
        ctx = NodeContext(
            node_id=node_id,
            class_type=class_type,
            prompt=self.prompt,
            dirs=self.server.dirs,
            return_types=self.server.catalog.return_types(class_type),
            progress=lambda value, total: self._progress(node_id, value, total),
            step_delay_s=knobs.step_delay_s,
            slow_s=float(knobs.slow_nodes.get(node_id) or knobs.slow_nodes.get(class_type) or 0.0),
            video_encoder=self.server.config.video_encoder,
            drift=knobs.drift,
            send_image=self._send_image,
            previews=knobs.previews,
        )
        return await run_node(ctx, inputs)

    async def _send_image(self, image_format: str, image: Image.Image) -> None:
        """ComfyUI's PREVIEW_IMAGE frame: event 1, format 1 (JPEG) or 2 (PNG), the image
        (its server.py `send_image`, `encode_bytes`), to the prompt's client only."""
        frame = io.BytesIO()
        frame.write(struct.pack(">II", 1, 1 if image_format == "JPEG" else 2))
        image.save(frame, format=image_format, quality=95, compress_level=1)
        await self.server.send_bytes(frame.getvalue(), self.client_id)

    def _check_interrupt(self) -> None:
        if self.server.interrupted:
            self.server.interrupted = False
            raise NodeInterrupted()

    async def _progress(self, node_id: str, value: int, total: int) -> None:
        self._check_interrupt()
        self._progress_entry(node_id).update({"value": value, "max": total, "state": "running"})
        await self._progress_state()
        await self.to_client(
            "progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id}
        )

    def _progress_entry(self, node_id: str) -> dict[str, Any]:
        return self.progress_nodes.setdefault(
            node_id,
            {
                "value": 0,  # ints until started: a cached output node reports 1/1, not 1.0/1.0
                "max": 1,
                "state": "pending",
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            },
        )

    async def _start_progress(self, node_id: str) -> None:
        self._progress_entry(node_id).update({"value": 0.0, "max": 1.0, "state": "running"})
        await self._progress_state()

    async def _finish_progress(self, node_id: str) -> None:
        state = self._progress_entry(node_id)
        state.update({"state": "finished", "value": state["max"]})
        await self._progress_state()

    async def _progress_state(self) -> None:
        nodes = {k: v for k, v in self.progress_nodes.items() if v["state"] != "pending"}
        await self.to_client("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes})

    async def _interrupted(self, node_id: str) -> None:
        data = {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": self.prompt[node_id]["class_type"],
            "executed": list(self.executed),
        }
        await self.message("execution_interrupted", data, broadcast=True)

    async def _failed(self, node_id: str, exc: Exception) -> None:
        if isinstance(exc, InjectedFailure):
            kind, text, trace = exc.exception_type, str(exc), _fake_traceback(node_id)
        else:
            kind, text, trace = _type_name(exc), str(exc), traceback.format_tb(exc.__traceback__)
        oom = kind in OOM_TYPES or "out of memory" in text.lower()
        node = self.prompt[node_id]
        inputs = {k: [None if is_link(v) else v] for k, v in node.get("inputs", {}).items()}
        data = {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": node["class_type"],
            "executed": list(self.executed),
            "exception_message": f"{text}\n{OOM_TIPS if oom else ''}",
            "exception_type": kind,
            "traceback": trace,
            "current_inputs": inputs,
            "current_outputs": list(self.prompt),  # ComfyUI: every node its cache keys
        }
        await self.message("execution_error", data)


def _fake_traceback(node_id: str) -> list[str]:
    return [
        '  File "/ComfyUI/execution.py", line 1, in execute\n    (stand-in)\n',
        f'  File "/ComfyUI/nodes.py", line 1, in node {node_id}\n    (injected failure)\n',
    ]


# --- running it ----------------------------------------------------------------------


def build_app(config: StandinConfig) -> web.Application:
    return Standin(config).app()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model_service_testing.comfy_standin", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument(
        "--base-dir", type=Path, required=True, help="input/, output/, temp/, models/ live here"
    )
    parser.add_argument(
        "--object-info",
        type=Path,
        default=os.environ.get("COMFY_STANDIN_OBJECT_INFO", OBJECT_INFO),
        help="/object_info snapshot of a real ComfyUI, JSON or gzipped JSON (env "
        "COMFY_STANDIN_OBJECT_INFO; default: the vendored ComfyUI 0.33.0 snapshot)",
    )
    parser.add_argument(
        "--models-json", type=Path, help='{"diffusion_models": ["x.safetensors"], ...}'
    )
    parser.add_argument("--video-encoder", choices=("auto", "ffmpeg", "pyav"), default="auto")
    parser.add_argument(
        "--knobs-json", help="initial test knobs, as POST /standin/config takes them"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    knobs = Knobs()
    if args.knobs_json:
        knobs.update(json.loads(args.knobs_json))
    models = json.loads(args.models_json.read_text()) if args.models_json else {}
    config = StandinConfig(args.base_dir, args.object_info, models, args.video_encoder, knobs)
    print(f"To see the GUI go to: http://{args.listen}:{args.port}", flush=True)
    web.run_app(build_app(config), host=args.listen, port=args.port, print=None, access_log=None)


# --- for tests: the stand-in as a real process ---------------------------------------


class StandinProcess:
    """`python -m model_service_testing.comfy_standin` on a free loopback port (its own
    process group)."""

    def __init__(
        self,
        base_dir: Path,
        object_info: Path = OBJECT_INFO,
        models: dict[str, list[str]] | None = None,
        knobs: dict[str, Any] | None = None,
        video_encoder: str = "auto",
    ) -> None:
        self.base_dir = base_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir.parent / f"{base_dir.name}-standin.log"
        self.args = [
            "--port",
            str(self.port),
            "--base-dir",
            str(base_dir),
            "--object-info",
            str(object_info),
        ]
        self.args += ["--video-encoder", video_encoder]
        if models:
            models_path = base_dir.parent / f"{base_dir.name}-models.json"
            models_path.write_text(json.dumps(models))
            self.args += ["--models-json", str(models_path)]
        if knobs:
            self.args += ["--knobs-json", json.dumps(knobs)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> StandinProcess:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "model_service_testing.comfy_standin", *self.args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"stand-in exited early; log:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/system_stats", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"stand-in not ready after {timeout}s; log:\n{self.log()[-4000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def configure(self, **knobs: Any) -> dict[str, Any]:
        response = httpx.post(self.url + "/standin/config", json=knobs, timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(self.url + "/standin/stats", timeout=10).json()
        return result

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> StandinProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


if __name__ == "__main__":
    main()
