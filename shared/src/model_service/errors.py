"""The one error hierarchy. Each class carries a stable `code` and its HTTP status.

HTTP mapping happens in exactly one place (`api/error_handlers.py`). The same codes
appear in failed job records (`job.error.code`) and in webhooks, so a client can branch
on them. Every message says what happened and what to do.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base of every error we raise on purpose."""

    code: ClassVar[str] = "internal_error"
    status_code: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


# --- caller mistakes (4xx) ---------------------------------------------------------


class InvalidInput(ServiceError):
    """The request or one of its fields is wrong. `field` names it where known."""

    code = "invalid_input"
    status_code = 422


class UrlNotAllowed(InvalidInput):
    """A URL points somewhere we will not fetch from (private address, bad scheme)."""

    code = "url_not_allowed"


class FetchFailed(InvalidInput):
    """A URL could not be fetched (unreachable, error status, too large, too slow)."""

    code = "fetch_failed"


class UploadNotFound(InvalidInput):
    code = "upload_not_found"


class AudioUnreadable(InvalidInput):
    """The audio file cannot be decoded (corrupt, truncated, not audio)."""

    code = "audio_unreadable"


class AudioSilent(InvalidInput):
    """The audio holds only silence: nothing to animate."""

    code = "audio_silent"


class AudioTooLong(InvalidInput):
    """Longer than the service's cap (MAX_AUDIO_S)."""

    code = "audio_too_long"


class AudioTooShort(InvalidInput):
    code = "audio_too_short"


class LoraInvalid(InvalidInput):
    """A LoRA that is not a usable safetensors LoRA (bad source, header, size), or one
    that does not fit the model it is applied to (model_service.lora_fit)."""

    code = "lora_invalid"


class LoraUnavailable(InvalidInput):
    """A LoRA that cannot be fetched (unreachable, not found, refused)."""

    code = "lora_unavailable"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"
    status_code = 413


class DecodedTooLarge(PayloadTooLarge):
    """A request's images would take more memory decoded than MAX_DECODED_MB."""

    code = "decoded_too_large"


class Unauthorized(ServiceError):
    code = "unauthorized"
    status_code = 401


class NotFound(ServiceError):
    code = "not_found"
    status_code = 404


class IdempotencyConflict(ServiceError):
    """`PUT /v1/jobs/{id}` repeated with a different body."""

    code = "idempotency_conflict"
    status_code = 409


class InvalidTransition(ServiceError):
    """A job state change that the state machine forbids (a bug if it escapes)."""

    code = "invalid_transition"
    status_code = 409


class WrongJobState(ServiceError):
    """The action does not apply to the job as it is now (e.g. adding a segment to a
    video that is not interactive, or finalizing one that is still running)."""

    code = "wrong_job_state"
    status_code = 409


class NotReady(ServiceError):
    code = "not_ready"
    status_code = 503


class QueueFull(ServiceError):
    """The model's queue holds MAX_QUEUED_JOBS jobs; `retry_after_s` says when to try."""

    code = "queue_full"
    status_code = 429


class StoreUnavailable(ServiceError):
    """The shared job store (Redis, QUEUE_URL) cannot be reached; nothing was changed."""

    code = "store_unavailable"
    status_code = 503


class StoreBusy(StoreUnavailable):
    """The job store (SQLite in DATA_DIR) is locked by another process beyond the busy
    timeout; nothing was changed."""

    code = "store_busy"


class DiskFull(StoreUnavailable):
    """The disk of DATA_DIR is full: the job store or a file could not be written;
    nothing was changed."""

    code = "disk_full"


class ProvisionError(ServiceError):
    """Model weights could not be put in place; the message says what to do."""

    code = "model_download_failed"
    status_code = 503


# --- job failures (recorded on the job; never raised to an HTTP caller) ----------


class JobFailure(ServiceError):
    """Base for errors that end a job as `failed`."""

    code = "job_failed"


class ModelError(JobFailure):
    """The model code raised an exception while running the job."""

    code = "model_error"


class OutOfMemory(JobFailure):
    code = "out_of_memory"


class CudaError(JobFailure):
    """A CUDA error that poisons the process; the worker is replaced."""

    code = "cuda_error"


class WorkerCrashed(JobFailure):
    code = "worker_crashed"


class JobTimeout(JobFailure):
    code = "timeout"


class Interrupted(JobFailure):
    """The service died while the job ran, too many times to try again."""

    code = "interrupted"


class Poison(JobFailure):
    """The job was started QUEUE_MAX_ATTEMPTS times and each time its worker died (a
    fleet on Redis): it is not tried again."""

    code = "poison"


class SetupFailed(JobFailure):
    code = "setup_failed"


class StorageFailed(JobFailure):
    """The outputs could not be uploaded to the S3 bucket; they stay downloadable here."""

    code = "storage_failed"


class PartFailed(JobFailure):
    """A part of a long video (a segment or leg, a child job) failed or was canceled."""

    code = "part_failed"


class InputMissing(JobFailure):
    """A file this job takes from another job (the last frame of the segment before)
    is not there."""

    code = "input_missing"


class ComposeFailed(JobFailure):
    """Joining the parts of a long video (stitching, colour correction) failed."""

    code = "compose_failed"


class JobCanceled(Exception):
    """Raised inside a worker at the next step after a cancel; not a failure."""
