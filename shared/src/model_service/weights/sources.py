"""Where weights come from: a Hub file (`hf://owner/repo/path@revision`), an https
URL of a `.safetensors` file, or a CivitAI download URL. Parsing checks the form only;
which addresses may be fetched is `SafeHttpClient`'s rule."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from model_service.errors import LoraInvalid
from model_service.weights.fetch import is_civitai

_SUFFIX = ".safetensors"
_MAX_SOURCE_LEN = 2048
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_CIVITAI_DOWNLOAD = re.compile(r"/api/download/models/([0-9]{1,12})/?")
_FORMS = (
    "use hf://<owner>/<repo>/<path/to/file.safetensors>[@<revision>], an https:// URL of a "
    ".safetensors file or a CivitAI download URL (https://civitai.com/api/download/models/<id>)"
)


@dataclass(frozen=True)
class LoraSource:
    """Where a LoRA comes from: a Hub file (`repo_id`, `path`, `revision`) or a `url`
    (a CivitAI download URL among them)."""

    normalized: str  # `hf://owner/repo/path@revision`, or the https URL
    filename: str  # the file's base name, made safe for disk and ComfyUI
    url: str | None = None
    repo_id: str | None = None
    path: str | None = None
    revision: str | None = None

    @property
    def key(self) -> str:
        return hashlib.sha256(self.normalized.encode()).hexdigest()[:16]

    @property
    def stored_name(self) -> str:
        return f"{self.key}_{self.filename}"

    def describe(self) -> str:
        """For messages and logs; a URL's query (often a signature) is left out."""
        if self.url is None:
            return self.normalized
        parts = urlsplit(self.normalized)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + (
            "?…" if parts.query else ""
        )


def _safe_filename(name: str) -> str:
    stem = _UNSAFE_CHARS.sub("_", name[: -len(_SUFFIX)]).strip("._") or "lora"
    return stem[:100] + _SUFFIX


def _check_path(path: str, value: str, field: str) -> list[str]:
    """The segments of a file path: non-empty, no `.`/`..`, ends in `.safetensors`."""
    segments = path.split("/")
    if not segments[-1].lower().endswith(_SUFFIX):
        raise LoraInvalid(
            f"{field}: {value!r} does not name a .safetensors file; {_FORMS}", field=field
        )
    if any(s in ("", ".", "..") or "\\" in s or not s.isprintable() for s in segments):
        raise LoraInvalid(
            f"{field}: {value!r} has an empty, '.' or '..' path segment or odd characters; "
            f"{_FORMS}",
            field=field,
        )
    return segments


def _parse_hub(value: str, field: str) -> LoraSource:
    body = value[len("hf://") :]
    revision = "main"
    suffix = re.fullmatch(r"(.+\.safetensors)@([^@]+)", body, flags=re.IGNORECASE)
    if suffix:  # hf://owner/repo/file.safetensors@rev
        body, revision = suffix.group(1), suffix.group(2)
    owner, _, rest = body.partition("/")
    repo, _, path = rest.partition("/")
    if "@" in repo and not suffix:  # hf://owner/repo@rev/file.safetensors (HfFileSystem)
        repo, _, revision = repo.partition("@")
    if not (_HUB_NAME.fullmatch(owner) and _HUB_NAME.fullmatch(repo)):
        raise LoraInvalid(
            f"{field}: {value!r} does not start with a valid <owner>/<repo>; {_FORMS}",
            field=field,
        )
    if not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision:
        raise LoraInvalid(
            f"{field}: {revision!r} is not a valid revision (a branch, tag or commit); {_FORMS}",
            field=field,
        )
    segments = _check_path(path, value, field)
    repo_id = f"{owner}/{repo}"
    return LoraSource(
        normalized=f"hf://{repo_id}/{path}@{revision}",
        filename=_safe_filename(segments[-1]),
        repo_id=repo_id,
        path=path,
        revision=revision,
    )


def _parse_url(value: str, field: str) -> LoraSource:
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise LoraInvalid(f"{field}: not a valid URL ({exc}); {_FORMS}", field=field) from None
    if not host or parts.username is not None or parts.password is not None:
        raise LoraInvalid(
            f"{field}: the URL needs a host and no user:password@; {_FORMS}", field=field
        )
    if is_civitai(value):
        filename = _civitai_filename(parts.path, parts.query, value, field)
    else:
        filename = _safe_filename(
            _check_path(unquote(parts.path).removeprefix("/"), value, field)[-1]
        )
    shown = f"[{host}]" if ":" in host else host
    scheme = parts.scheme.lower()
    netloc = shown if port in (None, {"https": 443, "http": 80}[scheme]) else f"{shown}:{port}"
    url = urlunsplit((scheme, netloc, parts.path, parts.query, ""))
    return LoraSource(normalized=url, filename=filename, url=url)


def _civitai_filename(path: str, query: str, value: str, field: str) -> str:
    """`civitai_<id>.safetensors` for a download URL; its query may pick the file
    (`type`, `format`, ...) but not carry a token: the service sends its CIVITAI_TOKEN."""
    match = _CIVITAI_DOWNLOAD.fullmatch(path)
    if match is None:
        raise LoraInvalid(
            f"{field}: {value[:200]!r} is not a CivitAI download URL; copy the address of "
            "the model version's Download button (https://civitai.com/api/download/models/"
            "<id>)",
            field=field,
        )
    if any(k.lower() == "token" for k, _ in parse_qsl(query, keep_blank_values=True)):
        raise LoraInvalid(
            f"{field}: remove the token from the CivitAI URL (it would be stored with the "
            "job); the service sends the operator's CIVITAI_TOKEN itself",
            field=field,
        )
    return f"civitai_{match.group(1)}{_SUFFIX}"


def parse_lora_source(value: str, *, field: str) -> LoraSource:
    """Parses `hf://<owner>/<repo>/<path>[@<revision>]`, an http(s) `.safetensors` URL or
    a CivitAI download URL (`https://civitai.com/api/download/models/<id>`).

    Raises `LoraInvalid` naming `field`. Checks only the form; no network access.
    """
    value = value.strip()
    if len(value) > _MAX_SOURCE_LEN:
        raise LoraInvalid(f"{field}: longer than {_MAX_SOURCE_LEN} characters", field=field)
    scheme = value.partition("://")[0].lower()
    if scheme == "hf":
        return _parse_hub(value, field)
    if scheme in ("https", "http"):  # which addresses may be fetched: SafeHttpClient's rules
        return _parse_url(value, field)
    raise LoraInvalid(f"{field}: {value[:200]!r} is not a LoRA source; {_FORMS}", field=field)
