"""Accepting a job: validate the input, resolve its files, store it, wake the runner.

Every file an input refers to is fetched, decoded and checked here, before the job is
stored, so bad input is a 422 naming the field, and a stored job has everything it
needs on local disk (a restart or a second attempt fetches nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from model_service import media
from model_service.audio import prepare_audio
from model_service.custom_input import is_custom, off_error
from model_service.decode_budget import DecodeBudget, RequestImages
from model_service.errors import IdempotencyConflict, InvalidInput, QueueFull, UploadNotFound
from model_service.fetch import SafeHttpClient
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.jobs.store import SubmitStore
from model_service.media_refs import MediaKind, media_fields
from model_service.offloop import off_loop
from model_service.problems import invalid_input
from model_service.runner import JobRunner
from model_service.settings import Settings
from model_service.staging import InputStaging
from model_service.webhooks import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS

UPLOAD_PREFIX = "upl_"


def new_job_id() -> str:
    return uuid.uuid4().hex


def validation_error(exc: ValidationError, prefix: str = "input") -> InvalidInput:
    """A pydantic error as one InvalidInput naming the bad fields (the first few)."""
    return invalid_input(
        exc.errors(include_url=False, include_input=False), "invalid input", prefix
    )


class CustomInput(Protocol):
    """An engine's hook for jobs that bring their own graph (`custom_input`): their
    request's shape, with `files: {name: reference}`, and its check."""

    @property
    def model(self) -> type[BaseModel]: ...

    async def check(self, request: Any) -> dict[str, MediaKind]:
        """`request`: a validated `model`. Raises InvalidInput naming the first problem;
        returns the kind of each of its files."""


@dataclass(frozen=True)
class RequestOptions:
    events: list[str]
    storage: dict[str, Any] | None
    request_hash: str
    existing: Job | None  # the job a repeated id refers to


class JobSubmitter:
    def __init__(
        self,
        settings: Settings,
        input_model: type[BaseModel],
        store: SubmitStore,
        http: SafeHttpClient,
        runner: JobRunner,
        check_input: Callable[[Any, Settings], None] | None = None,
        custom: CustomInput | None = None,
        check_against_model: Callable[[Any, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self._settings = settings
        self._custom = custom  # a ComfyUI service with ALLOW_CUSTOM_WORKFLOWS
        self.custom_model = None if custom is None else custom.model  # shown in /docs
        self._model = input_model
        self._check = check_input or (lambda data, settings: None)
        self._check_model = check_against_model or (lambda data, info: None)
        self._media = media_fields(input_model)
        self._has_seed = "seed" in input_model.model_fields
        self._store = store
        self._http = http
        self._runner = runner
        self.decoding = DecodeBudget(settings.max_decoded_mb * 2**20)

    async def submit(
        self,
        raw_input: Any,
        *,
        job_id: str | None,
        webhook: str | None,
        webhook_events: list[str] | None,
        base_url: str,
        storage: dict[str, Any] | None = None,
    ) -> tuple[Job, bool]:
        """Store a new job (or return the existing one for a repeated `job_id`).
        `storage` is a validated `StorageRequest`, as a dict."""
        options = await self.check_options(raw_input, job_id, webhook, webhook_events, storage)
        if options.existing is not None:
            return options.existing, False
        events, storage, request_hash = options.events, options.storage, options.request_hash
        custom, kinds = None, {}
        if is_custom(raw_input):  # the job brings its own ComfyUI workflow
            if self._custom is None:
                raise off_error()
            try:
                custom = self._custom.model.model_validate(raw_input)
            except ValidationError as exc:
                raise validation_error(exc) from None
            kinds = await self._custom.check(custom)
            values = custom.model_dump(mode="json")
            seed = None
        else:
            values = self.validate(raw_input)
            seed = values.get("seed")
            if self._has_seed and seed is None:
                seed = secrets.randbelow(2**32)
                values["seed"] = seed
        own_id = job_id is not None  # the client's: another request may race for it
        job_id = job_id or new_job_id()
        staging = InputStaging(self._settings, job_id)
        try:
            if custom is not None:
                public, prepared = await self._resolve_files(values, kinds, staging)
            else:
                public, prepared = await self._resolve_media(values, staging)
            if not own_id or self._store.find(job_id) is None:  # a fleet: shared before
                await self.share_inputs(job_id, staging.dir)  # the job is stored
            job = Job(
                id=job_id,
                status=JobStatus.QUEUED,
                input=public,
                prepared_input=prepared,
                seed=seed,
                request_hash=request_hash,
                webhook=webhook,
                webhook_events=events,
                base_url=base_url,
                storage=storage,
            )
            job, created = self._store.create(job, durable=False)  # synced below
            if created:  # this request won the id: its files become the job's
                staging.commit()
                if own_id:  # a fleet: the winner's again, over any a losing request shared
                    await self.share_inputs(job_id, staging.final)
        finally:
            staging.discard()
        if created:  # the store published it
            await self._runner.source.submitted(job)
        # on disk before anyone is told (group commit, off the event loop); the runner
        # may begin the job meanwhile: a crash before the sync loses a job nobody knew of
        await self._store.sync()
        return job, created

    async def check_options(
        self,
        request: Any,
        job_id: str | None,
        webhook: str | None,
        webhook_events: list[str] | None,
        storage: dict[str, Any] | None,
    ) -> RequestOptions:
        """The checks every kind of job request shares: webhook, storage, and the repeat
        of an existing `job_id` (the same request: that job; another: a conflict)."""
        events = list(webhook_events or DEFAULT_WEBHOOK_EVENTS)
        unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
        if unknown:
            raise InvalidInput(
                f"unknown webhook_events {unknown}; choose from {list(WEBHOOK_EVENTS)}",
                field="webhook_events",
            )
        storage = {k: v for k, v in (storage or {}).items() if v is not None} or None
        # like webhook; a request without storage hashes as it did before storage existed
        hashed = [request, webhook, events, *([storage] if storage else [])]
        # in a thread for megabytes of data URIs; a small request is hashed here
        request_hash = await off_loop(_text_size(hashed), _hash, hashed)
        if job_id is not None and (existing := self._store.find(job_id)) is not None:
            if existing.request_hash != request_hash:
                raise IdempotencyConflict(
                    f"job {job_id} exists with a different request; use a new id, or "
                    "repeat the original request exactly",
                    job_id=job_id,
                )
            return RequestOptions(events, storage, request_hash, existing)
        self.check_queue_length()
        if webhook is not None:
            await self._http.check_webhook(webhook, field="webhook")
        if storage is not None and not (storage.get("bucket") or self._settings.s3_bucket):
            raise InvalidInput(
                "storage: no bucket to upload to; name one in storage.bucket, or configure "
                "S3_BUCKET",
                field="storage.bucket",
            )
        return RequestOptions(events, storage, request_hash, None)

    def check_queue_length(self) -> None:
        """429 `queue_full` when MAX_QUEUED_JOBS jobs wait already."""
        limit = self._settings.max_queued_jobs
        if not limit:
            return
        queued = self._store.count(JobStatus.QUEUED)
        if queued >= limit:
            wait_s = min(600, max(1, round(self._runner.mean_run_s)))
            raise QueueFull(
                f"{queued} jobs are waiting (MAX_QUEUED_JOBS={limit}); submit again after "
                f"Retry-After ({wait_s} s), or add pods",
                queued=queued,
                limit=limit,
                retry_after_s=wait_s,
            )

    def validate(self, raw_input: Any, prefix: str = "input") -> dict[str, Any]:
        """The input checked by the service's model and rules (its own, and those of the
        model as loaded), as JSON values."""
        try:
            validated = self._model.model_validate(raw_input)
        except ValidationError as exc:
            raise validation_error(exc, prefix) from None
        try:
            self._check(validated, self._settings)
            self._check_model(validated, self._runner.worker_info)
        except InvalidInput as exc:
            if prefix != "input":
                exc.message = f"{prefix}: {exc.message}"
            raise
        return validated.model_dump(mode="json")

    async def _resolve_files(
        self, values: dict[str, Any], kinds: dict[str, MediaKind], staging: InputStaging
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A custom workflow's files, fetched and checked by the kind of their loader."""
        paths, request = {}, RequestImages()
        for name, ref in values["files"].items():
            field = f"input.files.{name}"
            target = staging.path(f"file_{name}")
            written = await self.materialize(ref, kinds[name], field, target, request)
            paths[name] = staging.final_path(written)
        public = {
            **values,
            "files": {name: shorten_ref(ref) for name, ref in values["files"].items()},
        }
        return public, {**values, "files": paths}

    async def _resolve_media(
        self, values: dict[str, Any], staging: InputStaging
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        public, prepared = dict(values), dict(values)
        request = RequestImages()
        for name, kind in self._media.items():
            value = values.get(name)
            if value is None:
                continue
            refs = value if isinstance(value, list) else [value]
            paths = []
            for index, ref in enumerate(refs):
                field = f"input.{name}" + (f"[{index}]" if isinstance(value, list) else "")
                target = staging.path(f"{name}_{index}.{_SUFFIX[kind]}")
                written = await self.materialize(ref, kind, field, target, request)
                paths.append(staging.final_path(written))
            shown = [shorten_ref(ref) for ref in refs]
            public[name] = shown if isinstance(value, list) else shown[0]
            prepared[name] = paths if isinstance(value, list) else paths[0]
        return public, prepared

    async def share_inputs(self, job_id: str, inputs_dir: Path) -> None:
        """A fleet: the files under `inputs_dir` reachable from the pod that runs the job."""
        await self._runner.source.share_inputs(job_id, inputs_dir)

    async def materialize(
        self,
        ref: str,
        kind: MediaKind,
        field: str,
        target: Path,
        request: RequestImages | None = None,
    ) -> Path:
        """The file behind `ref`, fetched, checked and written to `target` (a video: with
        its container's suffix); returns where it was written. `request`: what the
        request's images take decoded so far (DecodeBudget)."""
        data = await self.read_reference(ref, field)
        if kind == "audio":  # checked (decodes, not silent, within MAX_AUDIO_S), as a wav
            await asyncio.to_thread(
                prepare_audio, data, target, field=field, max_duration_s=self._settings.max_audio_s
            )
            return target
        if kind == "video":  # kept as sent, once a frame decodes
            suffix = await asyncio.to_thread(media.video_suffix, data, field=field)
            target = target.with_suffix(suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(target.write_bytes, data)
            return target
        size, channels = media.image_header(data, field=field)  # no pixel decoded yet
        async with self.decoding.hold(size, channels, field, request):
            # a thumbnail is decoded and written in place: the thread hop costs more
            pixels_bytes = size[0] * size[1] * channels
            await off_loop(pixels_bytes, self._decode_to_png, data, field, target)
        return target

    def _decode_to_png(self, data: bytes, field: str, target: Path) -> None:
        image = media.decode_image(data, field=field, max_pixels=self._settings.max_image_pixels)
        target.parent.mkdir(parents=True, exist_ok=True)
        if media.is_plain_rgb_png(data):  # decoded fine, and already what we would write
            target.write_bytes(data)
        else:
            image.save(target, format="PNG")

    async def read_reference(self, ref: str, field: str) -> bytes:
        """The bytes behind a URL, data URI or upload id."""
        if ref.startswith("data:"):
            data, _mime = await off_loop(len(ref), media.parse_data_uri, ref, field=field)
            return data
        if "://" in ref:
            return (await self._http.get(ref, field=field)).data
        if ref.startswith(UPLOAD_PREFIX) and self._store.get_upload(ref) is not None:
            uploaded = await self._runner.source.read_upload(ref)
            if uploaded is None:
                raise UploadNotFound(
                    f"{field}: upload {ref} has expired (OUTPUT_RETENTION_HOURS); upload the "
                    "file again",
                    field=field,
                )
            return uploaded
        raise UploadNotFound(
            f"{field}: {ref[:80]!r} is not an https URL, a data URI or a known upload id; "
            "send the file to POST /v1/uploads first and use the id it returns",
            field=field,
        )


_SUFFIX: dict[MediaKind, str] = {"image": "png", "audio": "wav", "video": "mp4"}


def _text_size(value: Any) -> int:
    """About the size of `value` as JSON (its strings' lengths): what `_hash` costs."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(key) + _text_size(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return sum(_text_size(item) for item in value)
    return 8


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def shorten_ref(ref: str) -> str:
    if ref.startswith("data:") and len(ref) > 120:
        return f"{ref[:60]}...({len(ref)} chars)"
    return ref
