"""Errors mapped to HTTP (the one place), auth, request ids and HTTP metrics."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_service.api.console import is_console_path
from model_service.comfy.custom import off_error
from model_service.errors import InvalidInput, PayloadTooLarge, ServiceError, Unauthorized
from model_service.logs import get_logger
from model_service.metrics import Metrics

log = get_logger("model_service.http")

OPEN_PATHS = frozenset({"/health", "/ready"})
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
        if any(tuple(err.get("loc", ()))[:3] == _WORKFLOW_LOC for err in exc.errors()):
            return error_response(off_error())  # a custom workflow, on a service without
        problems = [
            {"field": _field_name(err.get("loc", ())), "message": err.get("msg")}
            for err in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid"
        field = problems[0]["field"] if problems else None
        return error_response(
            InvalidInput(f"invalid request: {summary}", field=field, problems=problems)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        body = {
            "error": {
                "code": "internal_error",
                "message": "an unexpected error occurred; it is logged with this request's "
                "id. Retry, and report it if it persists",
            }
        }
        return JSONResponse(body, status_code=500)


class ObserveMiddleware:
    """Pure ASGI (no extra task per request): request id, auth, the body size check for
    declared lengths (uploads are capped by their route; FastAPI's `max_body_size` stops
    streamed bodies), the request log line and HTTP metrics."""

    def __init__(
        self, app: ASGIApp, api_keys: list[str], metrics: Metrics, max_body_bytes: int
    ) -> None:
        self.app = app
        self.keys = [key.encode() for key in api_keys]
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        request_id = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:64]
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "location": ""}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                answer["status"] = message["status"]
                answer["location"] = headers.get("location", "")
            await send(message)

        refusal = self._refusal(request)
        try:
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
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
        if path != "/v1/uploads" and _declared_length(request) > self.max_body_bytes:
            return error_response(
                PayloadTooLarge(
                    f"request body is larger than MAX_REQUEST_BYTES={self.max_body_bytes}; "
                    "send large files to POST /v1/uploads or give a URL",
                    limit=self.max_body_bytes,
                )
            )
        return None

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
        log.info(
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


def _field_name(loc: tuple[object, ...] | list[object]) -> str:
    """`("body", "input", "steps")` -> `input.steps` (the name the caller sent)."""
    parts = [str(part) for part in loc]
    return ".".join(parts[1:] if parts[:1] == ["body"] and len(parts) > 1 else parts)
