"""Errors mapped to HTTP (the one place), auth, request ids and HTTP metrics."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_service.api.console import is_console_path
from model_service.custom_input import off_error
from model_service.errors import PayloadTooLarge, ServiceError, Unauthorized
from model_service.logs import get_logger
from model_service.metrics import Metrics
from model_service.problems import clip, invalid_input

log = get_logger("model_service.http")

OPEN_PATHS = frozenset({"/health", "/ready"})
MULTIPART_OVERHEAD = 2**20  # allowed above MAX_UPLOAD_BYTES for an upload's framing
_WORKFLOW_LOC = ("body", "input", "workflow")
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
}


def error_response(error: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=error.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        retry_after = exc.details.get("retry_after_s")  # 429 queue_full, 503 store_unavailable
        headers = {"retry-after": str(max(1, int(retry_after)))} if retry_after else None
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(tuple(err.get("loc", ()))[:3] == _WORKFLOW_LOC for err in errors):
            return error_response(off_error())  # a custom workflow, on a service without
        named = ({"loc": _body_loc(err.get("loc", ())), "msg": err.get("msg")} for err in errors)
        return error_response(invalid_input(named, "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": clip(str(exc.detail), 1000)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def internal_error() -> ServiceError:
    """What a caller is told of a bug (its traceback is logged, never sent)."""
    return ServiceError(
        "an unexpected error occurred; it is logged with this request's id. Retry, and "
        "report it if it persists"
    )


class ObserveMiddleware:
    """Pure ASGI (no extra task per request): request id, auth, the body size check for
    declared lengths and the cap of streamed ones (here, not FastAPI's `max_body_size`,
    whose 413 is plain text), 500s for unexpected errors, the request log line and HTTP
    metrics."""

    def __init__(
        self,
        app: ASGIApp,
        api_keys: list[SecretStr],
        metrics: Metrics,
        max_body_bytes: int,
        max_upload_bytes: int,
    ) -> None:
        self.app = app
        self.keys = [key.get_secret_value().encode() for key in api_keys]
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        request_id = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:64]
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "location": "", "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                answer["started"] = True
                answer["status"] = message["status"]
                answer["location"] = headers.get("location", "")
            await send(message)

        refusal = self._refusal(request)
        send_json = json_errors(send_with_id)
        try:
            if refusal is not None:
                await refusal(scope, receive, send_json)
            else:
                await self.app(scope, self._capped(request.url.path, receive), send_json)
        except Exception:
            # answered here, not by Starlette's outermost handler, which re-raises and
            # so makes the server close the connection (and log the error once more)
            if answer["started"]:
                raise  # a response is under way: only ending the connection tells
            log.exception("unhandled error", path=request.url.path)
            await error_response(internal_error())(scope, receive, send_json)
        finally:
            self._observe(request, scope, answer, time.perf_counter() - started)

    def _refusal(self, request: Request) -> Response | None:
        path = request.url.path
        public = path in OPEN_PATHS or is_console_path(path)  # the page asks for the key
        if self.keys and not public and not _authorized(request, self.keys):
            return error_response(
                Unauthorized(
                    "missing or wrong API key; send `Authorization: Bearer <key>` with one "
                    "of the keys in API_KEYS"
                ),
                headers={"www-authenticate": "Bearer"},
            )
        if _declared_length(request) > self._body_limit(path):
            return error_response(self._too_large(path))
        return None

    def _body_limit(self, path: str) -> int:
        if path == "/v1/uploads":  # the file, and its multipart framing
            return self.max_upload_bytes + MULTIPART_OVERHEAD
        return self.max_body_bytes

    def _too_large(self, path: str) -> PayloadTooLarge:
        if path == "/v1/uploads":
            limit = self.max_upload_bytes
            advice = f"upload is larger than MAX_UPLOAD_BYTES={limit}; send a smaller file"
        else:
            limit = self.max_body_bytes
            advice = (
                f"request body is larger than MAX_REQUEST_BYTES={limit}; send large files "
                "to POST /v1/uploads"
            )
        return PayloadTooLarge(f"{advice} or give a URL", limit=limit)

    def _capped(self, path: str, receive: Receive) -> Receive:
        """`receive`, stopping a streamed body (no Content-Length) at the limit."""
        limit, received = self._body_limit(path), 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # FastAPI passes an HTTPException on as it is
                    raise StarletteHTTPException(413, self._too_large(path).message)
            return message

        return capped

    def _observe(
        self, request: Request, scope: Scope, answer: dict[str, Any], seconds: float
    ) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        status = answer["status"]
        self.metrics.http_latency.labels(request.method, route, str(status)).observe(seconds)
        if request.url.path in OPEN_PATHS:
            return
        job_id = scope.get("path_params", {}).get("job_id") or (
            answer["location"].rpartition("/v1/jobs/")[2] or None
        )
        # one line per request is a lot at a job's pace: successes at debug
        level = log.debug if status < 400 else log.info
        level(
            "request",
            job_id=job_id,
            method=request.method,
            path=request.url.path,
            status=status,
            ms=round(seconds * 1000, 1),
        )


def _authorized(request: Request, keys: list[bytes]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.strip().encode()
    # compare with every key, in constant time per key, without stopping early
    return sum(secrets.compare_digest(given, key) for key in keys) > 0


def _declared_length(request: Request) -> int:
    try:
        return int(request.headers.get("content-length", "0"))
    except ValueError:
        return 0


def _body_loc(loc: tuple[object, ...] | list[object]) -> list[object]:
    """`("body", "input", "steps")` -> `input.steps` (the name the caller sent)."""
    parts = list(loc)
    return parts[1:] if parts[:1] == ["body"] and len(parts) > 1 else parts


def json_errors(send: Send) -> Send:
    """`send`, with every plain-text error (Starlette's own: 413 from the body limit,
    400/416 from a bad Range) rewritten into the one error shape,
    `{"error": {"code", "message"}}`."""
    held: list[Message] = []
    text = bytearray()

    async def wrapped(message: Message) -> None:
        if (
            message["type"] == "http.response.start"
            and message["status"] >= 400
            and MutableHeaders(scope=message).get("content-type", "").startswith("text/plain")
        ):
            held.append(message)
            return
        if not held or message["type"] != "http.response.body":
            await send(message)
            return
        text.extend(message.get("body", b"")[:1000])
        if message.get("more_body", False):
            return
        start = held.pop()
        status = start["status"]
        reason = text.decode(errors="replace").strip() or HTTPStatus(status).phrase
        error = {"code": _HTTP_CODES.get(status, "http_error"), "message": reason}
        payload = json.dumps({"error": error}).encode()
        headers = MutableHeaders(scope=start)
        headers["content-type"] = "application/json"
        headers["content-length"] = str(len(payload))
        await send(start)
        await send({"type": "http.response.body", "body": payload})

    return wrapped
