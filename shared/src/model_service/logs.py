"""structlog set-up: JSON in containers, readable in a terminal.

Context variables (`request_id`, `job_id`) bound with `structlog.contextvars` appear on
every line logged while they are bound, including lines from the standard library's
`logging` (uvicorn's), which are routed through the same processors.

No line carries a secret: tracebacks are rendered without the frames' local variables
(a request's headers, the settings), and, as a last line of defence, every rendered line
is scrubbed of the known secrets (`Settings.secret_values`) and of bearer tokens and
cookies, whatever logged them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from model_service.job_logs import JOB_LOGS

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 4  # shorter values would blank out ordinary words
# `Bearer <token>`, and the value of an `Authorization`/`Cookie` header however printed
# ("cookie: a=b", "'cookie': 'a=b'", "(b'cookie', b'a=b')", JSON escapes included)
_TOKEN = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s\"'\\,;)\]}]+")
_HEADER = re.compile(
    r"(?i)\b((?:set-)?cookie|authorization|x-api-key)"  # the header's name
    r"((?:\\?['\"])?\s*[:=,]\s*(?:b?\\?['\"])?)"  # what joins name and value
    r"[^'\"\\\n]+"
)


class Redactor:
    """Replaces secrets in a rendered log line (the structlog processor after the
    renderer)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = {s for s in secrets if len(s) >= MIN_SECRET_CHARS}
        # as written, and as a JSON renderer escapes them
        forms = values | {json.dumps(s)[1:-1] for s in values}
        self._secrets = sorted(forms, key=len, reverse=True)  # longest first

    def __call__(self, logger: Any, method: str, line: Any) -> str:
        return self.redact(line)  # the renderer's line: a str

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _TOKEN.sub(rf"\1\2{REDACTED}", text)
        return _HEADER.sub(rf"\1\2{REDACTED}", text)


def configure_logging(
    level: str = "INFO",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    job_log_lines: int = 500,
) -> None:
    """`job_log_lines`: lines kept per job for its own log (model_service.job_logs)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    redactor = Redactor(secrets)
    JOB_LOGS.configure(job_log_lines, redactor.redact)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        JOB_LOGS,  # a line about a job whose log is kept: kept there too
    ]
    renderer: Any
    final: list[Any] = []
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        final = [  # no locals: they hold request headers and the settings
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        # a line below the level is dropped before it is rendered, once a job's own log
        # had it (JOB_LOGS: its lines at any level)
        processors=[
            *shared,
            _BelowLevel(level),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *final,
                renderer,
                redactor,
            ],
        )
    )
    logging.captureWarnings(True)  # Python warnings become structured log lines too
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # we log requests ourselves
    # one line per request (health checks every few seconds, signed CDN URLs): too much
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _BelowLevel:
    """Drops a line under LOG_LEVEL (the stdlib logger would drop it later, rendered)."""

    def __init__(self, level: str) -> None:
        self._levels = logging.getLevelNamesMapping()  # a new dict each call: kept once
        self._level = self._levels.get(level.upper(), logging.INFO)

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        name = str(event.get("level", method)).upper()
        if self._levels.get(name, logging.INFO) < self._level:
            raise structlog.DropEvent
        return event


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
