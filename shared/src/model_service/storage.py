"""Uploads job outputs to an S3-compatible bucket (S3_BUCKET, or the job's `storage`).

The endpoint, region and credentials always come from the settings and the usual AWS_*
variables (boto3 reads them); a job's `storage` request may only choose the bucket, the
key prefix and how long presigned URLs stay valid. boto3 blocks, so uploads run in a
thread; it is imported on first use, so services without storage never load it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_service.errors import StorageFailed
from model_service.jobs.record import Job
from model_service.settings import Settings

MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit

# S3 bucket naming rules (general purpose buckets): the pattern, plus `_check_bucket`.
_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")

_HINTS = {
    "NoSuchBucket": "create the bucket, or name an existing one (S3_BUCKET or storage.bucket)",
    "AccessDenied": "check that the credentials may write to this bucket",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY (and S3_REGION)",
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "EndpointConnectionError": "check S3_ENDPOINT_URL and that the store is reachable",
}
_DEFAULT_HINT = (
    "check that the bucket exists, that the credentials (AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY) may write to it, and S3_ENDPOINT_URL / S3_REGION"
)


class StorageRequest(BaseModel):
    """A job's own upload target; each field left out comes from the settings."""

    model_config = ConfigDict(extra="forbid")

    bucket: str | None = Field(
        None,
        min_length=3,
        max_length=63,
        pattern=_BUCKET_PATTERN,
        description="Bucket for this job's outputs instead of S3_BUCKET (same endpoint "
        "and credentials).",
    )
    prefix: str | None = Field(
        None,
        max_length=512,
        pattern=r"^[^\x00-\x1f\x7f\\]*$",
        description="Key prefix instead of S3_PREFIX; keys are `<prefix><job id>/<name>`.",
    )
    presign_s: int | None = Field(
        None,
        ge=0,
        le=MAX_PRESIGN_S,
        description="Presigned GET URLs valid this long instead of S3_PRESIGN_S; "
        "0: plain object URLs.",
    )

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if ".." in value or _is_ip_address(value):
            raise ValueError("not a valid S3 bucket name (no '..', not an IP address)")
        if value.startswith(_BUCKET_RESERVED_PREFIXES) or value.endswith(_BUCKET_RESERVED_SUFFIXES):
            raise ValueError("S3 reserves this bucket name prefix or suffix")
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is not None and (".." in value or value.startswith("/")):
            raise ValueError("a key prefix may not contain '..' or start with '/'")
        return value


@dataclass(frozen=True)
class StoredObject:
    name: str  # the output's name
    bucket: str
    key: str
    url: str  # plain object URL, or a presigned GET URL
    size: int


class OutputStore:
    """One bucket and key prefix on the settings' endpoint."""

    def __init__(self, settings: Settings, bucket: str, prefix: str, presign_s: int) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.presign_s = presign_s
        self._endpoint = settings.s3_endpoint_url
        self._region = settings.s3_region
        secret = settings.bucket_secret_access_key  # worker-comfyui's BUCKET_*; else AWS_*
        self._keys = (settings.bucket_access_key_id, secret and secret.get_secret_value())

    @classmethod
    def for_job(cls, settings: Settings, request: dict[str, Any] | None) -> OutputStore | None:
        """The job's `storage` request over the settings; None when no bucket is
        configured anywhere."""
        request = request or {}  # validated when the job was submitted
        bucket = request.get("bucket") or settings.s3_bucket
        if bucket is None:
            return None
        prefix, presign_s = request.get("prefix"), request.get("presign_s")
        return cls(
            settings,
            bucket,
            settings.s3_prefix if prefix is None else prefix,
            settings.s3_presign_s if presign_s is None else presign_s,
        )

    async def upload(self, job: Job, files: list[Path]) -> list[StoredObject]:
        """Upload each file as `<prefix><job id>/<file name>`; StorageFailed if one fails."""
        return await asyncio.to_thread(self._upload_all, job.id, files)

    def _upload_all(self, job_id: str, files: list[Path]) -> list[StoredObject]:
        from boto3.exceptions import Boto3Error  # type: ignore[import-untyped]
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        stored = []
        for path in files:
            key = f"{self.prefix}{job_id}/{path.name}"
            try:
                content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                self._client().upload_file(
                    str(path), self.bucket, key, ExtraArgs={"ContentType": content_type}
                )
                url = self.url(key)
            except (BotoCoreError, ClientError, Boto3Error, ValueError) as exc:
                raise self._failure(path.name, exc) from exc
            stored.append(StoredObject(path.name, self.bucket, key, url, path.stat().st_size))
        return stored

    def url(self, key: str) -> str:
        """A presigned GET URL when `presign_s` > 0, else the plain object URL."""
        client = self._client()
        if self.presign_s > 0:
            url: str = client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=self.presign_s,
            )
            return url
        if self._endpoint:  # S3-compatible stores: path style
            return f"{self._endpoint.rstrip('/')}/{self.bucket}/{quote(key)}"
        region = client.meta.region_name
        host = "s3.amazonaws.com" if region in (None, "us-east-1") else f"s3.{region}.amazonaws.com"
        if "." in self.bucket:  # a dotted name breaks the TLS certificate of the virtual host
            return f"https://{host}/{self.bucket}/{quote(key)}"
        return f"https://{self.bucket}.{host}/{quote(key)}"

    def _client(self) -> Any:
        return _client(self._endpoint, self._region, *self._keys)

    def _failure(self, name: str, exc: Exception) -> StorageFailed:
        code, detail = _s3_error(exc)
        where = self._endpoint or f"AWS S3 ({self._region or 'default region'})"
        return StorageFailed(
            f"uploading output {name!r} to bucket {self.bucket!r} at {where} failed: "
            f"{code} ({detail}); {_HINTS.get(code, _DEFAULT_HINT)}. The outputs can still be "
            "downloaded from the job's output `url`s",
            bucket=self.bucket,
            endpoint=self._endpoint,
            s3_code=code,
        )


@functools.cache
def _client(
    endpoint: str | None,
    region: str | None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> Any:
    """One S3 client per endpoint (clients are thread-safe; making one takes ~0.1 s);
    without keys, boto3 finds its own (AWS_* variables, ...)."""
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    options: dict[str, Any] = {
        "signature_version": "s3v4",
        "connect_timeout": 10,
        "read_timeout": 60,
        "retries": {"mode": "standard", "max_attempts": 3},
    }
    if endpoint:  # S3-compatible stores: path-style URLs, no checksums that only AWS knows
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    session = boto3.session.Session()  # the default session is not thread-safe
    return session.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(**options),
    )


def _s3_error(exc: BaseException) -> tuple[str, str]:
    """(code, message) of the S3 error behind `exc` (boto3 wraps some), else its type."""
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        error = response.get("Error", {}) if isinstance(response, dict) else {}
        if error.get("Code"):
            return str(error["Code"]), str(error.get("Message") or cause)
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__, str(exc)


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
