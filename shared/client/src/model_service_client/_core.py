"""What the sync and async clients share: jobs, errors, parsing, auth, `wait` bookkeeping."""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import os
import re
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

URL_ENV = "MODEL_SERVICE_URL"
KEY_ENV = "MODEL_SERVICE_API_KEY"
RUNPOD_KEY_ENV = "RUNPOD_API_KEY"
RUNPOD_API = "https://api.runpod.ai/v2"
DEFAULT_TIMEOUT_S = 30.0
STREAM_READ_S = 60.0  # the service sends a keep-alive comment every 15 s
MAX_PREFER_WAIT_S = 90  # the service's cap on `Prefer: wait`
RECONNECT_S = 60.0  # `wait` rides out a service that cannot be reached for this long
MAX_REDIRECTS = 5
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
SETTLED = TERMINAL | {"awaiting_input"}  # nothing happens until the client acts
RUNPOD_STATUSES = {
    "IN_QUEUE": "queued",
    "IN_PROGRESS": "running",
    "COMPLETED": "succeeded",
    "FAILED": "failed",
    "CANCELLED": "canceled",
    "TIMED_OUT": "failed",
}
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_input",
    429: "too_many_requests",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}
_SERVICE_PATH = re.compile(r"^/v1/jobs/[^/]+/")  # another pod of a fleet: same API keys

ProgressCallback = Callable[["Job"], object]
# a chain's segment: its own fields (`prompt`, `negative_prompt`, `num_frames`, `seed`,
# `loras`: what the service lets a segment set), or just its prompt
Segment = Mapping[str, Any] | str


@dataclass(frozen=True)
class Output:
    """One output file: `url` to download it, or (RunPod, no object storage) its bytes
    returned inline as `data`."""

    name: str
    url: str | None
    content_type: str | None = None
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Job:
    """A job as the API shows it; `raw` is the whole JSON body."""

    id: str
    status: str  # queued, running, awaiting_input, succeeded, failed, canceled
    progress: float  # 0 to 1
    outputs: list[Output]
    error: dict[str, Any] | None  # {code, message, ...} when failed
    raw: dict[str, Any] = field(repr=False)

    @property
    def done(self) -> bool:
        """Succeeded, failed or canceled."""
        return self.status in TERMINAL

    @property
    def settled(self) -> bool:
        """Done, or waiting for the client's input (an interactive long video)."""
        return self.status in SETTLED

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        progress = body.get("progress") or {}
        return cls(
            id=str(body["id"]),
            status=str(body["status"]),
            progress=float(progress.get("fraction", 0.0)),
            outputs=[
                Output(name=o["name"], url=o.get("url"), content_type=o.get("content_type"))
                for o in body.get("outputs") or []
            ],
            error=body.get("error"),
            raw=body,
        )

    @classmethod
    def from_runpod(cls, body: dict[str, Any]) -> Job:
        """A RunPod `/run`, `/runsync` or `/status` answer; `output` is what the service's
        serverless handler returns (`{status, seed, outputs, info, timings}`), or while
        the job runs, its progress (`{step, total, fraction}`)."""
        runpod_status = str(body.get("status", ""))
        status = RUNPOD_STATUSES.get(runpod_status, runpod_status.lower())
        output = body.get("output")
        outputs: list[Output] = []
        progress = 0.0
        if status == "succeeded":
            progress = 1.0
            if isinstance(output, dict):
                outputs = [_runpod_output(item) for item in output.get("outputs") or []]
        elif isinstance(output, dict) and "fraction" in output:
            progress = float(output["fraction"])
        error: dict[str, Any] | None = None
        if runpod_status == "TIMED_OUT":
            error = {
                "code": "timeout",
                "message": "the job ran past the endpoint's execution timeout (RunPod: TIMED_OUT)",
            }
        elif status == "failed":
            error = _runpod_error(body.get("error"))
        return cls(
            id=str(body["id"]),
            status=status,
            progress=progress,
            outputs=outputs,
            error=error,
            raw=body,
        )


@dataclass(frozen=True)
class JobPage:
    """One page of `list`: pass `next_cursor` as `cursor` for the next (None: the last)."""

    jobs: list[Job]
    next_cursor: int | None


@dataclass(frozen=True)
class JobEvent:
    """A server-sent event: `kind` is `status` or `progress`; `job` the job after it."""

    kind: str
    job: Job


class ServiceError(Exception):
    """An error answer (4xx, 5xx): the API's stable `code`, its `message` and the rest of
    its error body as `details`. `status_code` is None for `JobFailed`."""

    def __init__(
        self,
        status_code: int | None,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details or {}

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServiceError:
        """From a read response: `{"error": {"code", "message", ...}}`, or whatever else
        answered (a proxy's page, RunPod's `{"detail"}` or `{"error": "..."}`)."""
        status = response.status_code
        code = _HTTP_CODES.get(status, f"http_{status}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict) and "code" in error:
                details = {k: v for k, v in error.items() if k not in ("code", "message")}
                return cls(status, str(error["code"]), str(error.get("message", "")), details)
            for key in ("error", "detail", "message"):
                if body.get(key):
                    text = body[key]
                    message = text if isinstance(text, str) else json.dumps(text)
                    return cls(status, code, message, {})
        text = response.text.strip()[:300] or response.reason_phrase
        return cls(status, code, f"HTTP {status}: {text}", {})


class JobFailed(ServiceError):
    """`wait(..., raise_on_failure=True)` on a job that failed: its error code and
    message; `job` is the failed job."""

    def __init__(self, job: Job) -> None:
        error = dict(job.error or {})
        code = str(error.pop("code", "job_failed"))
        message = str(error.pop("message", f"job {job.id} failed"))
        super().__init__(None, code, message, error)
        self.job = job


class BearerAuth(httpx.Auth):
    """`Authorization: Bearer <key>` for the service's own URLs only: its origin and, with
    `fleet_pods`, any `/v1/jobs/...` URL (another pod of a fleet, where a job's outputs
    are). Never for other hosts (an output's presigned object-storage URL)."""

    def __init__(self, key: str | None, base_url: str, fleet_pods: bool) -> None:
        self._key = key
        self._origin = _origin(httpx.URL(base_url))
        self._fleet_pods = fleet_pods

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._key and (
            _origin(request.url) == self._origin
            or (self._fleet_pods and _SERVICE_PATH.match(request.url.path))
        ):
            request.headers["Authorization"] = f"Bearer {self._key}"
        yield request


class Waiter:
    """The bookkeeping of `wait`: progress callbacks, the deadline, and how long the
    service may stay unreachable."""

    def __init__(
        self,
        job_id: str,
        on_progress: ProgressCallback | None,
        timeout: float | None,
        raise_on_failure: bool,
        poll_s: float,
    ) -> None:
        self.job_id = job_id
        self._on_progress = on_progress
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._raise = raise_on_failure
        self._poll_s = poll_s
        self._down_since: float | None = None
        self._status = "unknown"

    def seen(self, job: Job) -> bool:
        """Reports the job; True once it is settled. Raises `JobFailed` (asked for) or
        `TimeoutError`."""
        self._down_since = None
        self._status = job.status
        if self._on_progress is not None:
            self._on_progress(job)
        if job.settled:
            if self._raise and job.status == "failed":
                raise JobFailed(job)
            return True
        self.check_deadline()
        return False

    def check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise TimeoutError(f"job {self.job_id} is still {self._status} after {self._timeout} s")

    def unreachable(self, exc: httpx.TransportError) -> None:
        """A dropped stream or a failed request: tolerated for RECONNECT_S in a row."""
        self.check_deadline()
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        elif now - self._down_since > RECONNECT_S:
            raise exc

    def stream_timeout(self, timeout: float) -> httpx.Timeout:
        read = STREAM_READ_S
        if self._deadline is not None:
            read = max(0.1, min(read, self._deadline - time.monotonic() + 0.05))
        return httpx.Timeout(timeout, read=read)

    def pause(self) -> float:
        if self._deadline is None:
            return self._poll_s
        return max(0.0, min(self._poll_s, self._deadline - time.monotonic()))


def service_url(base_url: str | None) -> str:
    url = base_url or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"no service URL: pass base_url or set {URL_ENV}")
    return url.rstrip("/")


def env_key(api_key: str | None, variable: str) -> str | None:
    return api_key if api_key is not None else os.environ.get(variable) or None


def runpod_url(endpoint: str) -> str:
    """An endpoint id, or a full URL (the SDK's local dev server, `--rp_serve_api`)."""
    if endpoint.startswith(("http://", "https://")):
        return endpoint.rstrip("/")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", endpoint):
        raise ValueError(f"not a RunPod endpoint id or URL: {endpoint!r}")
    return f"{RUNPOD_API}/{endpoint}"


def job_path(job_id: str, suffix: str = "") -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}{suffix}"


def submit_request(
    input: dict[str, Any], job_id: str | None, webhook: str | None, wait_s: float
) -> tuple[str, str, dict[str, Any], dict[str, str]]:
    """method, path, JSON body and headers of a job submission."""
    body: dict[str, Any] = {"input": input}
    if webhook is not None:
        body["webhook"] = webhook
    return create_request("/v1/jobs", body, job_id, wait_s)


def create_request(
    collection: str, body: dict[str, Any], job_id: str | None, wait_s: float
) -> tuple[str, str, dict[str, Any], dict[str, str]]:
    """method, path, JSON body and headers of a creation in `collection` (`/v1/jobs`,
    `/v1/chains`, `/v1/travels`, `/v1/joins`, `/v1/redos`): POST, or PUT with your own id."""
    headers = {}
    if wait_s > 0:
        headers["Prefer"] = f"wait={min(max(1, round(wait_s)), MAX_PREFER_WAIT_S)}"
    if job_id is None:
        return "POST", collection, body, headers
    return "PUT", f"{collection}/{quote(job_id, safe='')}", body, headers


def long_video_body(**fields: Any) -> dict[str, Any]:
    """The body of a long video: the fields given (None: the service's default)."""
    return {name: value for name, value in fields.items() if value is not None}


def segments_of(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """A chain's segments: objects as given, a string as `{"prompt": it}`."""
    if isinstance(segments, (str, dict)):
        raise TypeError("segments is a list (of segment objects or prompts)")
    return [{"prompt": s} if isinstance(s, str) else dict(s) for s in segments]


def chain_path(job_id: str, suffix: str) -> str:
    return f"/v1/chains/{quote(job_id, safe='')}{suffix}"


def runpod_submit_request(
    input: dict[str, Any], webhook: str | None, wait_s: float, timeout: float
) -> tuple[str, dict[str, Any], dict[str, int], float]:
    """path, JSON body, query and read timeout of a RunPod submission: `/run`, or with
    `wait_s` `/runsync` waiting up to that long (1 to 300 s)."""
    body: dict[str, Any] = {"input": input}
    if webhook is not None:
        body["webhook"] = webhook
    if wait_s <= 0:
        return "/run", body, {}, timeout
    wait_ms = min(max(1000, round(wait_s * 1000)), 300_000)
    return "/runsync", body, {"wait": wait_ms}, timeout + wait_ms / 1000


def list_params(status: str | None, limit: int, cursor: int | None) -> dict[str, str | int]:
    params: dict[str, str | int] = {"limit": limit}
    if status is not None:
        params["status"] = status
    if cursor is not None:
        params["cursor"] = cursor
    return params


def page_from_json(body: dict[str, Any]) -> JobPage:
    return JobPage([Job.from_json(j) for j in body["jobs"]], body.get("next_cursor"))


def upload_file(
    file: str | os.PathLike[str] | bytes, filename: str | None
) -> tuple[str, IO[bytes] | bytes, str]:
    """(name, content, content type) of an upload: a path is opened (the caller closes)."""
    if isinstance(file, bytes):
        name = filename or "file"
        content: IO[bytes] | bytes = file
    else:
        path = Path(file)
        name = filename or path.name
        content = path.open("rb")
    return name, content, mimetypes.guess_type(name)[0] or "application/octet-stream"


def output_target(dest_dir: Path, name: str) -> Path:
    """Where an output goes: its base name only, never outside `dest_dir`."""
    base = Path(name).name
    if base in ("", ".", ".."):
        raise ValueError(f"unusable output name {name!r}")
    return dest_dir / base


def part_path(target: Path) -> Path:
    """The partial file a download is written to (renamed to `target` when complete)."""
    return target.with_name(target.name + ".part")


def open_part(target: Path) -> IO[bytes]:
    target.parent.mkdir(parents=True, exist_ok=True)
    return part_path(target).open("wb")


def write_file(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def redirect_url(response: httpx.Response) -> str | None:
    if response.is_redirect and "location" in response.headers:
        return str(response.url.join(response.headers["location"]))
    return None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _runpod_output(item: dict[str, Any]) -> Output:
    data = None
    if "base64" in item:
        try:
            data = base64.b64decode(item["base64"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"output {item.get('name')!r} is not valid base64") from exc
    return Output(
        name=str(item["name"]),
        url=item.get("url"),
        content_type=item.get("content_type"),
        data=data,
    )


def _runpod_error(error: object) -> dict[str, Any]:
    """The handler's error is our `{code, message, ...}` as a JSON string (RunPod wants a
    string); anything else (RunPod's own, e.g. `Job ID not found`) becomes its message."""
    if isinstance(error, str):
        try:
            parsed = json.loads(error)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "code" in parsed:
            return parsed
        return {"code": "runpod_error", "message": error}
    if isinstance(error, dict) and "code" in error:
        return error
    return {"code": "runpod_error", "message": "the job failed" if error is None else str(error)}
