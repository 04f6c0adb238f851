"""Our ComfyUI client (HTTP + websocket) for ComfyUI 0.33 or newer.

`run()` follows one prompt to its end without trusting any single signal:

1. the websocket is connected with our `clientId` *before* the prompt is queued, and the
   prompt is queued with our own `prompt_id`, so no event can arrive unrecognised;
2. the end is `executing` with `node: null` for our prompt (history written);
   `execution_success` / `execution_error` / `execution_interrupted` come just before
   it, while the history is not written yet: if `executing` null does not follow within
   half a second, `/history/{id}` is read with retries anyway. A success whose expected
   output nodes all sent `executed` needs no `/history` read at all;
3. a poll of `/queue` + `/history` runs whenever the websocket is quiet for
   `poll_interval_s` or drops, so a dead socket never hangs a job; a prompt that is in
   neither the queue nor the history means ComfyUI restarted (`ComfyCrashed`);
4. a hard timeout interrupts our prompt and raises `ComfyTimeout`; cancelling the task
   that awaits `run()` interrupts or dequeues the prompt too.

Images an output node sends over the websocket (`SaveImageWebsocket`) are binary frames
with no prompt or node id: they belong to the node our prompt's last `executing` named,
and are outputs only when that node is an output node (`expect_outputs`); a sampler's
latent previews (the same frames, sent while a sampler runs) are dropped.

Cancelling only ever touches our prompt: a pending prompt is deleted from the queue, a
running one is interrupted with `POST /interrupt {"prompt_id"}` (never a global one).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import mimetypes
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, NoReturn

import aiohttp

from model_service.comfy.errors import (
    ComfyCrashed,
    ComfyCudaError,
    ComfyExecutionError,
    ComfyInterrupted,
    ComfyOutOfMemory,
    ComfyOutputMissing,
    ComfyTimeout,
    ComfyUnavailable,
    ComfyValidationError,
)
from model_service.comfy.workflow import node_order
from model_service.errors import ServiceError
from model_service.logs import get_logger

log = get_logger("model_service.comfy")

OOM_TYPES = {"torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"}
OOM_MARKERS = ("out of memory", "this error means you ran out of memory on your gpu")
CUDA_FAULT_MARKERS = (
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "cublas_status",
    "cudnn_status",
    "cudnn error",
    "nccl error",
)
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
# the events ComfyUI also lists in the history entry's `status.messages`
_STATUS_EVENTS = frozenset({"execution_start", "execution_cached", *TERMINAL_EVENTS})
MEDIA_SUFFIXES = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"),
    "video": (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"),
    "audio": (".flac", ".mp3", ".wav", ".opus", ".ogg", ".m4a", ".aac"),
}
_WS_LOST = "_ws_lost"  # internal events pushed to a run's queue
_CANCELED = "_canceled"
_FORGET_AFTER_S = 0.25  # consumed history entries are deleted in batches this often
_END_GRACE_S = 0.5  # after a terminal event, how long to wait for `executing` node=null
_WS_IMAGE = "_ws_image"  # internal event: an image frame came while our prompt ran
_WS_MAX_MESSAGE = 1 << 30  # full-size images come as single frames (aiohttp's default: 4 MB)
# Binary frames: a big-endian uint32 event type, then the payload (ComfyUI 0.33.0
# server.py:1302 `encode_bytes`; types in protocol.py `BinaryEventTypes`).
# PREVIEW_IMAGE (1): a uint32 image format (1 JPEG, 2 PNG), then the encoded image
# (server.py:1311-1333 `send_image`; what SaveImageWebsocket's ProgressBar preview and
# latent previews become, main.py:436 `hijack_progress`, for clients that do not announce
# `supports_preview_metadata`, as we do not).
# PREVIEW_IMAGE_WITH_METADATA (4): a uint32 length, that much JSON ({node_id, prompt_id,
# image_type, ...}), then the image (server.py:1335-1370; comfy_execution/progress.py:225).
_BINARY_PREVIEW_IMAGE = 1
_BINARY_PREVIEW_WITH_METADATA = 4
_IMAGE_SUFFIXES = {1: ".jpg", 2: ".png", "image/jpeg": ".jpg", "image/png": ".png"}
# nodes known to send their images over the websocket: kept when the caller did not say
# which nodes are outputs (`expect_outputs` None)
WS_IMAGE_NODES = frozenset({"SaveImageWebsocket"})


@dataclass(frozen=True)
class OutputFile:
    """One file a node reported in its history output, under any key."""

    node_id: str
    kind_key: str  # the history key it was listed under: images, gifs, videos, audio, ...
    filename: str
    subfolder: str
    type: str  # output | temp | input | websocket (sent over the socket: `data`)
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def relpath(self) -> str:
        """Path inside ComfyUI's `type` folder (output/, temp/, ...)."""
        return (
            str(PurePosixPath(self.subfolder, self.filename)) if self.subfolder else self.filename
        )

    @property
    def media(self) -> str:
        """image | video | audio | other, by extension (core video savers list under `images`)."""
        suffix = PurePosixPath(self.filename).suffix.lower()
        return next(
            (kind for kind, suffixes in MEDIA_SUFFIXES.items() if suffix in suffixes), "other"
        )


@dataclass(frozen=True)
class ComfyProgress:
    """A node started (`value` 0 of `max` 1) or a node reported a step."""

    prompt_id: str
    node_id: str | None
    node_type: str | None
    value: int
    max: int
    nodes_done: int
    nodes_total: int  # nodes in the graph minus those ComfyUI took from its cache


@dataclass(frozen=True)
class RunResult:
    prompt_id: str
    outputs: list[OutputFile]
    history: dict[str, Any]  # ComfyUI's history entry (or it, from the websocket events)
    cached_nodes: list[str]
    duration_s: float


ProgressCallback = Callable[[ComfyProgress], Awaitable[None] | None]


# --- errors from ComfyUI's answers ---------------------------------------------------


def validation_error(body: dict[str, Any]) -> ComfyValidationError:
    """`POST /prompt`'s refusal as one message naming each node, its class and input."""
    raw_error, raw_nodes = body.get("error"), body.get("node_errors")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    node_errors: dict[str, Any] = raw_nodes if isinstance(raw_nodes, dict) else {}
    problems = [
        _describe_node_problem(node_id, info, problem)
        for node_id, info in sorted(node_errors.items())
        for problem in (info.get("errors") or [])
    ]
    first = _first_problem(error, node_errors)
    if not problems:
        problems = [_describe_top_level(error)]
    message = "ComfyUI rejected the workflow: " + "; ".join(problems)
    return ComfyValidationError(
        message,
        error_type=error.get("type"),
        node_errors=_compact_node_errors(node_errors),
        **first,
    )


def _describe_node_problem(node_id: str, info: dict[str, Any], problem: dict[str, Any]) -> str:
    input_name = (problem.get("extra_info") or {}).get("input_name")
    where = f"node {node_id} ({info.get('class_type')})"
    if input_name:
        where += f" input '{input_name}'"
    details = problem.get("details")
    return f"{where}: {problem.get('message')}" + (f" ({details})" if details else "")


def _describe_top_level(error: dict[str, Any]) -> str:
    extra = error.get("extra_info") or {}
    where = f"node {extra['node_id']} ({extra.get('class_type')}): " if extra.get("node_id") else ""
    details = error.get("details")
    return f"{where}{error.get('message', 'invalid prompt')}" + (f" ({details})" if details else "")


def _first_problem(error: dict[str, Any], node_errors: dict[str, Any]) -> dict[str, Any]:
    for node_id, info in sorted(node_errors.items()):
        for problem in info.get("errors") or []:
            extra = problem.get("extra_info") or {}
            return {
                "node_id": node_id,
                "class_type": info.get("class_type"),
                "input_name": extra.get("input_name"),
            }
    extra = error.get("extra_info") or {}
    return {
        "node_id": extra.get("node_id"),
        "class_type": extra.get("class_type"),
        "input_name": None,
    }


def _compact_node_errors(node_errors: dict[str, Any]) -> dict[str, Any]:
    """Without `input_config` and tracebacks: the combo lists can be long."""
    compact: dict[str, Any] = {}
    for node_id, info in node_errors.items():
        errors = []
        for problem in info.get("errors") or []:
            extra = {
                k: v
                for k, v in (problem.get("extra_info") or {}).items()
                if k not in ("input_config", "traceback")
            }
            errors.append({**problem, "extra_info": extra})
        compact[node_id] = {**info, "errors": errors}
    return compact


def execution_error(data: dict[str, Any]) -> ServiceError:
    """An `execution_error` event as our error: OOM, CUDA fault, or a node's exception."""
    node_id, node_type = data.get("node_id"), data.get("node_type")
    kind = str(data.get("exception_type") or "Exception")
    text = str(data.get("exception_message") or "").strip()
    first_line = text.splitlines()[0] if text else "no message"
    details = {
        "node_id": node_id,
        "node_type": node_type,
        "exception_type": kind,
        "exception_message": text,
        "traceback": list(data.get("traceback") or [])[-10:],
    }
    where = f"node {node_id} ({node_type})"
    lowered = text.lower()
    if kind in OOM_TYPES or any(marker in lowered for marker in OOM_MARKERS):
        message = (
            f"ComfyUI ran out of GPU memory in {where}: {first_line}. Its models were unloaded; "
            "try again, or use a smaller resolution, fewer frames or a smaller batch."
        )
        return ComfyOutOfMemory(message, **details)
    if any(marker in lowered for marker in CUDA_FAULT_MARKERS):
        message = f"CUDA error in ComfyUI {where}: {first_line}. ComfyUI must be restarted."
        return ComfyCudaError(message, **details)
    return ComfyExecutionError(f"ComfyUI {where} failed: {kind}: {first_line}", **details)


def outcome_of(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """success | error | interrupted, and that event's data, from a history entry."""
    status = entry.get("status")
    if not isinstance(status, dict):  # ComfyUI leaves it null in odd cases
        return ("success" if entry.get("outputs") else "error"), {}
    for event, data in reversed(status.get("messages") or []):
        if event == "execution_error" and data.get("exception_type") == "ExecutionBlocked":
            continue
        if event in TERMINAL_EVENTS:
            return event.removeprefix("execution_"), dict(data)
    return ("success" if status.get("status_str") == "success" else "error"), {}


# --- one run's view of the event stream ----------------------------------------------


@dataclass
class _Watch:
    prompt_id: str
    graph: dict[str, Any]
    on_progress: ProgressCallback | None
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = field(default_factory=asyncio.Queue)
    cached: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    expect_outputs: frozenset[str] | None = None  # output nodes whose files we need
    error: dict[str, Any] | None = None
    ended: bool = False  # a terminal event came; `executing` node=null should follow
    succeeded: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)  # from `executed` events
    messages: list[list[Any]] = field(default_factory=list)  # as in the history's status
    on_start: Callable[[], None] | None = None  # once, when ComfyUI begins the prompt
    began: bool = False
    node: str | None = None  # the node ComfyUI runs now (the last `executing`)
    images: list[OutputFile] = field(default_factory=list)  # sent over the websocket
    gap: bool = False  # the websocket dropped after the prompt began: frames may be lost

    def begin(self) -> None:
        if not self.began:
            self.began = True
            if self.on_start is not None:
                self.on_start()

    async def next(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            return None

    async def handle(self, event: str, data: dict[str, Any]) -> bool:
        """Take one event; True when our prompt has ended."""
        if event in _STATUS_EVENTS:
            self.messages.append([event, data])
        if event in ("execution_start", "executing", "progress", *TERMINAL_EVENTS):
            self.begin()  # a missed `execution_start` (socket drop): any later sign counts
        if event == _WS_IMAGE:
            self._image(data)
        elif event == "executed":
            node, output = data.get("node"), data.get("output")
            if node is not None and isinstance(output, dict):
                self.outputs[str(node)] = output
        elif event == "execution_cached":
            self.cached = [str(n) for n in data.get("nodes") or []]
        elif event == "executing":
            node = data.get("node")
            self.node = None if node is None else str(node)
            if node is None:
                return True  # ended, and the history entry is written
            await self._node_started(str(node))
        elif event == "progress":
            node = data.get("node")
            await self._emit(
                None if node is None else str(node),
                int(data.get("value", 0)),
                int(data.get("max", 1)),
            )
        elif event == "execution_error":
            if data.get("exception_type") == "ExecutionBlocked":
                return False  # a blocked branch; the prompt goes on
            self.error = data
            self.ended = True
        elif event in TERMINAL_EVENTS:
            self.succeeded = event == "execution_success"
            # ComfyUI sends these before it writes the history entry; `executing` with
            # `node: null` follows once it is written, so wait for that (a short grace)
            self.ended = True
        return False

    def entry_from_events(self) -> dict[str, Any] | None:
        """The history entry, assembled from the websocket events, when they hold all
        of it: a success whose every expected output node sent `executed` (ComfyUI
        sends it for cached output nodes too). Saves the `/history` round trip."""
        if not self.succeeded or self.expect_outputs is None:
            return None
        if not self.expect_outputs <= self.outputs.keys() | {f.node_id for f in self.images}:
            return None
        status = {"status_str": "success", "completed": True, "messages": self.messages}
        return {"outputs": self.outputs, "status": status, "from_websocket": True}

    def _image(self, data: dict[str, Any]) -> None:
        """Keep an image frame when an output node sent it (not a sampler's preview)."""
        node_id = data.get("node") or self.node
        node = self.graph.get(node_id or "")
        class_type = node.get("class_type") if isinstance(node, dict) else None
        wanted = (
            node_id in self.expect_outputs
            if self.expect_outputs is not None
            else class_type in WS_IMAGE_NODES
        )
        if node_id is None or not wanted:
            return
        count = sum(1 for f in self.images if f.node_id == node_id) + 1
        self.images.append(
            OutputFile(
                node_id=node_id,
                kind_key="images",
                filename=f"{class_type or 'websocket'}_{count:05d}_{data['suffix']}",
                subfolder="",
                type="websocket",
                data=data["image"],
            )
        )

    def lost_images(self) -> bool:
        """The socket dropped while the prompt ran, and a node that sends its images
        over it is in the graph: some of them may never have come."""
        return self.gap and any(
            isinstance(node, dict) and node.get("class_type") in WS_IMAGE_NODES
            for node in self.graph.values()
        )

    async def _node_started(self, node_id: str) -> None:
        if node_id not in self.started:
            self.started.append(node_id)
        await self._emit(node_id, 0, 1)

    async def _emit(self, node_id: str | None, value: int, maximum: int) -> None:
        if self.on_progress is None:
            return
        node = self.graph.get(node_id or "")
        progress = ComfyProgress(
            prompt_id=self.prompt_id,
            node_id=node_id,
            node_type=node.get("class_type") if isinstance(node, dict) else None,
            value=value,
            max=maximum,
            nodes_done=max(len(self.started) - 1, 0),
            nodes_total=max(len(self.graph) - len(self.cached), 1),
        )
        result = self.on_progress(progress)
        if inspect.isawaitable(result):
            await result


# --- the client ----------------------------------------------------------------------


class ComfyClient:
    """One ComfyUI server, one websocket (our `client_id`), any number of concurrent runs."""

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str | None = None,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        poll_interval_s: float = 2.0,
        history_retries: int = 500,
        history_retry_s: float = 0.01,
        cancel_grace_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self._session = session
        self._own_session = session is None
        self._request_timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._poll_interval_s = poll_interval_s
        self._history_retries = history_retries
        self._history_retry_s = history_retry_s
        self._cancel_grace_s = cancel_grace_s
        self._watches: dict[str, _Watch] = {}
        self._canceled: set[str] = set()
        self._ws_task: asyncio.Task[None] | None = None
        self._ws_connected: asyncio.Event | None = None
        self._ws_error: str | None = None
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()
        self._to_forget: list[str] = []  # history entries to delete (batched)
        self._executing: str | None = None  # our prompt that ComfyUI runs now

    async def __aenter__(self) -> ComfyClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._to_forget:
            self._in_background(self._flush_forgotten(0.0))
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)
        if self._ws_task is not None:
            self._ws_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ws_task
        if self._own_session and self._session is not None:
            await self._session.close()

    # --- HTTP ----------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """(status, parsed JSON or None); ComfyUnavailable when ComfyUI does not answer."""
        try:
            async with self._http().request(
                method, self.base_url + path, timeout=self._request_timeout, **kwargs
            ) as response:
                text = await response.text()
                return response.status, _json_or_none(text, response.content_type)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ComfyUnavailable(
                f"ComfyUI at {self.base_url} does not answer ({method} {path}): {exc!r}"
            ) from exc

    async def _get_json(self, path: str, **kwargs: Any) -> Any:
        status, data = await self._request("GET", path, **kwargs)
        if status != 200:
            raise ServiceError(f"ComfyUI answered {status} to GET {path}")
        return data

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        status, _ = await self._request("POST", path, json=body)
        if status != 200:
            raise ServiceError(f"ComfyUI answered {status} to POST {path}")

    async def object_info(self, class_type: str | None = None) -> dict[str, Any]:
        path = "/object_info" if class_type is None else f"/object_info/{class_type}"
        result: dict[str, Any] = await self._get_json(path)
        return result

    async def system_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._get_json("/system_stats")
        return result

    async def queue(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._get_json("/queue")
        return result

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The finished prompt's entry, or None (queued, running and unknown look the same)."""
        data = await self._get_json(f"/history/{prompt_id}")
        entry = data.get(prompt_id) if isinstance(data, dict) else None
        return entry if isinstance(entry, dict) else None

    async def delete_history(self, prompt_id: str) -> None:
        await self._post("/history", {"delete": [prompt_id]})

    async def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        await self._post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt `prompt_id` if it is the one running (ComfyUI >= 0.3.x ignores others)."""
        await self._post("/interrupt", {"prompt_id": prompt_id})

    async def upload(
        self,
        data: bytes,
        filename: str,
        *,
        subfolder: str = "",
        type: str = "input",
        overwrite: bool = True,
    ) -> str:
        """Store a file in ComfyUI's input/ (or temp/, output/); returns the name for LoadImage."""
        form = aiohttp.FormData()
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        form.add_field("image", data, filename=filename, content_type=content_type)
        form.add_field("type", type)
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true" if overwrite else "false")
        status, body = await self._request("POST", "/upload/image", data=form)
        if status != 200 or not isinstance(body, dict) or "name" not in body:
            raise ServiceError(f"ComfyUI answered {status} to an upload of {filename!r}")
        name = f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else str(body["name"])
        return name if type == "input" else f"{name} [{type}]"

    async def queue_prompt(
        self,
        graph: dict[str, Any],
        *,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
    ) -> str:
        """Queue `graph` under our client id; ComfyValidationError if ComfyUI refuses any part."""
        body: dict[str, Any] = {
            "prompt": graph,
            "client_id": self.client_id,
            "prompt_id": prompt_id or str(uuid.uuid4()),
        }
        if extra_data:
            body["extra_data"] = extra_data
        status, data = await self._request("POST", "/prompt", json=body)
        if status == 400 and isinstance(data, dict) and isinstance(data.get("error"), dict):
            raise validation_error(data)
        if status != 200 or not isinstance(data, dict) or "prompt_id" not in data:
            raise ServiceError(f"ComfyUI answered {status} to POST /prompt: {str(data)[:300]}")
        queued = str(data["prompt_id"])
        if data.get("node_errors"):  # queued, but some outputs were dropped: not what we asked for
            with contextlib.suppress(ServiceError):
                await self.cancel(queued)
            raise validation_error({"error": {"type": "prompt_outputs_failed_validation"}, **data})
        return queued

    async def cancel(self, prompt_id: str) -> bool:
        """Dequeue our prompt if pending, interrupt it if running; True if it was either."""
        if prompt_id in self._watches:
            self._canceled.add(prompt_id)  # its run() then reports a cancel, not a lost prompt
        running, pending = _queue_ids(await self.queue())
        if prompt_id in pending:
            await self._post("/queue", {"delete": [prompt_id]})
            running, _ = _queue_ids(await self.queue())  # it may have started meanwhile
        if prompt_id in running:
            await self.interrupt(prompt_id)
        elif prompt_id in pending:
            self._notify(prompt_id, _CANCELED)
        return prompt_id in running or prompt_id in pending

    async def download(self, output: OutputFile, dest_path: Path) -> Path:
        """Stream the file from `/view` to `dest_path` (written whole or not at all)."""
        params = {"filename": output.filename, "subfolder": output.subfolder, "type": output.type}
        partial = dest_path.with_name(dest_path.name + ".part")
        try:
            async with self._http().get(
                self.base_url + "/view", params=params, timeout=aiohttp.ClientTimeout(sock_read=60)
            ) as response:
                if response.status == 404:
                    raise ComfyOutputMissing(
                        f"ComfyUI cannot serve its output {output.relpath} ({output.type})"
                    )
                if response.status != 200:
                    raise ServiceError(
                        f"ComfyUI answered {response.status} to GET /view for {output.relpath}"
                    )
                with partial.open("wb") as out:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        out.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            partial.unlink(missing_ok=True)
            raise ComfyUnavailable(
                f"lost ComfyUI while downloading {output.relpath}: {exc!r}"
            ) from exc
        os.replace(partial, dest_path)
        return dest_path

    @staticmethod
    def outputs(history_entry: dict[str, Any], *, include_temp: bool = False) -> list[OutputFile]:
        """Every file listed under every key of every node (images, gifs, videos, audio, ...)."""
        files: list[OutputFile] = []
        node_outputs = history_entry.get("outputs") or {}
        for node_id in sorted(node_outputs, key=node_order):
            for key, items in (node_outputs[node_id] or {}).items():
                if not isinstance(items, list):
                    continue
                for item in items:
                    found = _output_file(str(node_id), key, item)
                    if found is not None and (include_temp or found.type != "temp"):
                        files.append(found)
        return files

    # --- running a prompt ----------------------------------------------------------

    async def run(
        self,
        graph: dict[str, Any],
        *,
        on_progress: ProgressCallback | None = None,
        timeout_s: float = 3600.0,
        prompt_id: str | None = None,
        keep_history: bool = False,
        expect_outputs: Collection[str] | None = None,
        on_queued: Callable[[], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> RunResult:
        """Queue `graph`, follow it to its end, return its outputs (history deleted after).

        `expect_outputs`: the output nodes whose files the caller needs; when the
        websocket reported each of them, `/history` is not read (its entry is still
        deleted). Without it every output is taken from `/history`. `on_queued`: called
        once ComfyUI holds the prompt; `on_start`: once ComfyUI begins it (it may wait
        behind others first)."""
        expect = None if expect_outputs is None else frozenset(map(str, expect_outputs))
        watch = _Watch(
            prompt_id or str(uuid.uuid4()),
            graph,
            on_progress,
            expect_outputs=expect,
            on_start=on_start,
        )
        self._watches[watch.prompt_id] = watch
        loop = asyncio.get_running_loop()
        started, done = loop.time(), False
        try:
            await self._ensure_ws()
            await self._queue_watched(watch, graph)
            if on_queued is not None:
                on_queued()
            entry = await self._follow(watch, started + timeout_s, timeout_s)
            done = True
            return await self._conclude(watch, entry, loop.time() - started, keep_history)
        finally:
            self._watches.pop(watch.prompt_id, None)
            if not done:
                await self._abandon(watch.prompt_id)
            self._canceled.discard(watch.prompt_id)

    async def _queue_watched(self, watch: _Watch, graph: dict[str, Any]) -> None:
        queued = await self.queue_prompt(graph, prompt_id=watch.prompt_id)
        if queued != watch.prompt_id:  # an old ComfyUI minted its own id; the poll covers us
            self._watches.pop(watch.prompt_id, None)
            watch.prompt_id = queued
            self._watches[queued] = watch

    async def _follow(self, watch: _Watch, deadline: float, timeout_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self._time_out(watch, timeout_s)
            wait = min(self._poll_interval_s, remaining)
            event = await watch.next(min(wait, _END_GRACE_S) if watch.ended else wait)
            if event is None and watch.ended:  # no `executing` null: read history anyway
                entry = await self._history_with_retry(watch.prompt_id)
            elif event is None or event[0] in (_WS_LOST, _CANCELED):
                entry = await self._check(watch)
                if event is not None and event[0] == _WS_LOST:  # after it began: a gap
                    watch.gap = watch.gap or watch.began or entry is not None
                if entry is not None:
                    await self._settle(watch)
            elif await watch.handle(*event):
                entry = watch.entry_from_events() or await self._history_with_retry(watch.prompt_id)
            else:
                continue
            if entry is not None:
                return entry

    async def _settle(self, watch: _Watch) -> None:
        """The poll found the prompt done (our loop was late, or the socket quiet): the
        events already received, images sent over the socket among them, still count;
        with the socket up, the rest follow until `executing` null (each within a grace)."""
        connected = self._ws_connected is not None and self._ws_connected.is_set()
        while True:
            if not watch.events.empty():
                event: tuple[str, dict[str, Any]] | None = watch.events.get_nowait()
            elif connected:
                event = await watch.next(_END_GRACE_S)
            else:
                return
            if event is None:
                return
            if event[0] not in (_WS_LOST, _CANCELED) and await watch.handle(*event):
                return

    async def _history_with_retry(self, prompt_id: str) -> dict[str, Any] | None:
        """ComfyUI announces the end before it writes the history entry: wait for it."""
        for _ in range(self._history_retries):
            entry = await self.history(prompt_id)
            if entry is not None:
                return entry
            await asyncio.sleep(self._history_retry_s)
        return None  # the poll in `_follow` takes over

    async def _check(self, watch: _Watch, attempts: int = 3) -> dict[str, Any] | None:
        """Poll: None while queued or running, the entry when done; raise when it is gone."""
        prompt_id = watch.prompt_id
        for attempt in range(attempts):
            try:
                return await self._poll_state(watch)
            except ComfyUnavailable as exc:
                if attempt == attempts - 1:
                    raise ComfyCrashed(
                        f"ComfyUI stopped answering while prompt {prompt_id} was queued or "
                        f"running: {exc.message}",
                        prompt_id=prompt_id,
                    ) from exc
                await asyncio.sleep(0.3)
        return None

    async def _poll_state(self, watch: _Watch) -> dict[str, Any] | None:
        prompt_id = watch.prompt_id
        running, pending = _queue_ids(await self.queue())
        if prompt_id in running:
            watch.begin()
            return None
        if prompt_id in pending:
            return None
        entry = await self.history(
            prompt_id
        )  # after /queue: ComfyUI writes history before dequeuing
        if entry is not None:
            return entry
        if prompt_id in self._canceled:
            raise ComfyInterrupted(prompt_id)
        raise ComfyCrashed(
            f"ComfyUI no longer knows prompt {prompt_id}: it restarted, or something else "
            "removed the prompt",
            prompt_id=prompt_id,
        )

    async def _time_out(self, watch: _Watch, timeout_s: float) -> NoReturn:
        with contextlib.suppress(ServiceError):
            await self.cancel(watch.prompt_id)
            await self._wait_gone(watch.prompt_id)
            await self.delete_history(watch.prompt_id)
        raise ComfyTimeout(
            f"ComfyUI prompt {watch.prompt_id} did not finish within {timeout_s:g} s "
            "and was interrupted",
            prompt_id=watch.prompt_id,
            timeout_s=timeout_s,
        )

    async def _wait_gone(self, prompt_id: str) -> None:
        deadline = time.monotonic() + self._cancel_grace_s
        while time.monotonic() < deadline:
            running, pending = _queue_ids(await self.queue())
            if prompt_id not in running and prompt_id not in pending:
                return
            await asyncio.sleep(0.1)

    async def _abandon(self, prompt_id: str) -> None:
        """We stop following a prompt (error, task cancelled): make ComfyUI drop it too."""
        with contextlib.suppress(ServiceError, asyncio.CancelledError, TimeoutError):
            await asyncio.shield(asyncio.wait_for(self.cancel(prompt_id), self._cancel_grace_s))

    async def _conclude(
        self, watch: _Watch, entry: dict[str, Any], duration_s: float, keep: bool
    ) -> RunResult:
        outcome, data = outcome_of(entry)
        if not keep:
            self._forget(watch.prompt_id)
        if outcome == "interrupted":
            raise ComfyInterrupted(watch.prompt_id, data.get("node_id"))
        if outcome == "error":
            error = execution_error(data or watch.error or {})
            if isinstance(error, ComfyOutOfMemory):
                with contextlib.suppress(ServiceError):
                    await self.free(unload_models=True, free_memory=True)
            raise error
        if watch.lost_images():
            raise ComfyOutputMissing(
                "the connection to ComfyUI's websocket dropped while the prompt ran, and "
                "images sent over it may be lost; retry the job"
            )
        files = sorted(self.outputs(entry) + watch.images, key=lambda f: node_order(f.node_id))
        return RunResult(watch.prompt_id, files, entry, watch.cached, duration_s)

    def _forget(self, prompt_id: str) -> None:
        """Delete the history entry soon, in one request with the others that ended
        meanwhile: off the job's critical path, and one request per burst, not per job."""
        self._to_forget.append(prompt_id)
        if len(self._to_forget) == 1:
            self._in_background(self._flush_forgotten(_FORGET_AFTER_S))

    async def _flush_forgotten(self, delay_s: float) -> None:
        if not self._closed:
            await asyncio.sleep(delay_s)
        ids, self._to_forget = self._to_forget, []
        if ids:
            await self._post("/history", {"delete": ids})

    def _in_background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            with contextlib.suppress(ServiceError):
                await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- websocket -----------------------------------------------------------------

    def _ws_url(self) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={self.client_id}"

    async def _ensure_ws(self) -> None:
        if self._ws_task is None or self._ws_task.done():
            self._ws_connected = asyncio.Event()
            self._ws_task = asyncio.create_task(self._ws_loop(), name=f"comfy-ws-{self.client_id}")
        assert self._ws_connected is not None
        try:
            await asyncio.wait_for(self._ws_connected.wait(), self._connect_timeout_s)
        except TimeoutError as exc:
            raise ComfyUnavailable(
                f"cannot open ComfyUI's websocket at {self.base_url}: "
                f"{self._ws_error or 'no answer'}"
            ) from exc

    async def _ws_loop(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                async with self._http().ws_connect(
                    self._ws_url(), heartbeat=10.0, max_msg_size=_WS_MAX_MESSAGE
                ) as ws:
                    assert self._ws_connected is not None
                    self._ws_connected.set()
                    delay, self._ws_error = 0.1, None
                    await self._read(ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._ws_error = repr(exc)
            if self._watches:
                log.info(
                    "comfy websocket lost; polling meanwhile",
                    error=self._ws_error,
                    runs=len(self._watches),
                )
            if self._ws_connected is not None:
                self._ws_connected.clear()
            for prompt_id in list(self._watches):
                self._notify(prompt_id, _WS_LOST)
            if not self._watches:
                return  # nobody waits; the next run reconnects
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self._dispatch(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self._binary(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                return

    def _dispatch(self, text: str) -> None:
        message = _json_or_none(text, "application/json")
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return
        data: dict[str, Any] = message["data"]
        prompt_id, event = data.get("prompt_id"), str(message.get("type"))
        if event == "executing" or event in TERMINAL_EVENTS:
            running = event == "executing" and data.get("node") is not None
            self._executing = prompt_id if running and isinstance(prompt_id, str) else None
        if isinstance(prompt_id, str) and prompt_id in self._watches:
            self._watches[prompt_id].events.put_nowait((event, data))

    def _binary(self, frame: bytes) -> None:
        """An image frame, to our prompt that runs now (layout: `_BINARY_PREVIEW_IMAGE`)."""
        image = _image_frame(frame)
        if image is None:
            return
        prompt_id = image.pop("prompt_id", None) or self._executing
        watch = self._watches.get(prompt_id or "")
        if watch is not None:
            watch.events.put_nowait((_WS_IMAGE, image))

    def _notify(self, prompt_id: str, event: str) -> None:
        watch = self._watches.get(prompt_id)
        if watch is not None:
            watch.events.put_nowait((event, {}))


def _json_or_none(text: str, content_type: str) -> Any:
    if not text or "json" not in content_type:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _image_frame(frame: bytes) -> dict[str, Any] | None:
    """{image, suffix[, node, prompt_id]} from a binary image frame; None for other frames."""
    if len(frame) < 8:
        return None
    event, word = int.from_bytes(frame[:4], "big"), int.from_bytes(frame[4:8], "big")
    if event == _BINARY_PREVIEW_IMAGE and word in (1, 2):
        return {"image": bytes(frame[8:]), "suffix": _IMAGE_SUFFIXES[word]}
    if event == _BINARY_PREVIEW_WITH_METADATA:
        meta = _json_or_none(bytes(frame[8 : 8 + word]).decode(errors="replace"), "json")
        if not isinstance(meta, dict) or meta.get("image_type") not in _IMAGE_SUFFIXES:
            return None
        suffix = _IMAGE_SUFFIXES[meta["image_type"]]
        image: dict[str, Any] = {"image": bytes(frame[8 + word :]), "suffix": suffix}
        for key, name in (("node_id", "node"), ("prompt_id", "prompt_id")):
            if isinstance(meta.get(key), str):
                image[name] = meta[key]
        return image
    return None


def _queue_ids(queue: dict[str, Any]) -> tuple[set[str], set[str]]:
    def ids(items: Any) -> set[str]:
        return {str(item[1]) for item in items or [] if isinstance(item, list) and len(item) > 1}

    return ids(queue.get("queue_running")), ids(queue.get("queue_pending"))


def _output_file(node_id: str, key: str, item: Any) -> OutputFile | None:
    if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
        return None
    return OutputFile(
        node_id=node_id,
        kind_key=key,
        filename=item["filename"],
        subfolder=str(item.get("subfolder") or ""),
        type=str(item.get("type") or "output"),
    )
