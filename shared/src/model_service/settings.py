"""The one settings object, read from the environment once at start-up and passed down.

Every field is an environment variable of the same name in upper case (`DATA_DIR`,
`API_KEYS`, ...). The README's configuration table is generated from this class.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# credentials read from the environment by libraries (huggingface_hub, boto3, runpod):
# never settings here, but kept out of the logs too
SECRET_ENV = ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RUNPOD_API_KEY")


def bucket_settings(endpoint_url: str) -> dict[str, object]:
    """The S3_* settings a worker-comfyui BUCKET_ENDPOINT_URL stands for. runpod's
    `rp_upload` (which worker-comfyui calls) hands the URL to boto3 as the endpoint and
    uploads to `<job id>/<file>` with a 7-day presigned URL."""
    url = urlsplit(endpoint_url.strip())
    host = url.hostname or ""
    found: dict[str, object] = {"s3_prefix": "", "s3_presign_s": 7 * 24 * 3600}
    if host.endswith(".amazonaws.com") and ".s3." in host:  # <bucket>.s3.<region>.amazonaws.com
        bucket, _, rest = host.partition(".s3.")
        found["s3_bucket"] = bucket
        region = rest.split(".")[0]
        if region != "amazonaws":
            found["s3_region"] = region
        return found
    found["s3_endpoint_url"] = f"{url.scheme}://{url.netloc}"
    segment = url.path.strip("/").split("/")[0]
    if segment:
        found["s3_bucket"] = segment
    return found


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of one service process. Read once; never from `os.environ` later."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    mode: Literal["http", "serverless"] = Field(
        "http",
        description="`http`: the job API on PORT; `serverless`: a RunPod serverless worker "
        "(the runpod SDK's handler loop) on the same job engine.",
    )
    host: str = Field("0.0.0.0", description="Address the HTTP API listens on.")  # noqa: S104
    port: int | None = Field(None, description="HTTP port; default is the service's own port.")
    profile: Literal["full", "tiny"] = Field(
        "full",
        description="`full` loads the real models; `tiny` generates a random-weight model "
        "locally (no download) for demos and tests.",
    )
    data_dir: Path = Field(Path("data"), description="Job store (SQLite), inputs and outputs.")
    models_dir: Path = Field(Path("models"), description="Where model weights live.")
    hf_endpoint: str | None = Field(
        None,
        description="A Hugging Face Hub mirror to download models from (default: "
        "huggingface.co). `HF_TOKEN` is read as huggingface_hub reads it (model files and "
        "`hf://` LoRAs: private or gated repositories its account may read).",
    )
    model_variant: str | None = Field(
        None,
        description="Which of the service's models to load (Qwen: `edit`, `edit-2509` or "
        "`edit-2511`, each optionally with `-lightning-4` or `-lightning-8`); default: the "
        "service's own default.",
    )
    cpu_offload: Literal["auto", "none", "model", "sequential"] = Field(
        "auto",
        description="Qwen-Image-Edit only: where the model's components live. `auto` "
        "chooses from the free VRAM at start (bf16: everything on the GPU with >= 62 GB "
        "free, model offload with >= 24 GB, sequential below; Nunchaku: on the GPU with "
        ">= 36 GB, model offload above 18 GB, else its per-block offload); `none` keeps "
        "every component on the GPU; `model` moves one whole component at a time to the "
        "GPU (diffusers' enable_model_cpu_offload); `sequential` streams layer by layer "
        "(least VRAM, slowest; with Nunchaku: its per-block offload). The ComfyUI "
        "services ignore it (ComfyUI manages its own memory).",
    )
    worker_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for the model (OMP_NUM_THREADS in the worker); default: the "
        "library's own, or all cores but one with PROFILE=tiny so the API keeps a core.",
    )
    comfyui_url: str | None = Field(
        None,
        description="Use this running ComfyUI instead of launching the embedded one "
        "(outputs are then fetched over `/view` and stay in its output folder).",
    )
    comfyui_dir: Path | None = Field(
        None,
        description="ComfyUI checkout (v0.33.0 or newer) whose `main.py` the service "
        "launches when COMFYUI_URL is not set.",
    )
    comfyui_python: str | None = Field(
        None,
        description="Python interpreter that runs ComfyUI (its own environment); default: "
        "the service's own.",
    )
    comfyui_port: int = Field(
        8188, ge=1, le=65535, description="Port of the launched ComfyUI (on 127.0.0.1 only)."
    )
    comfyui_args: str | None = Field(
        None,
        description="Extra flags for the launched ComfyUI, split like a shell would (for "
        "example `--lowvram --preview-method none`).",
    )
    comfyui_start_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long the launched ComfyUI may take to answer before it is killed "
        "and started again.",
    )
    warmup: bool = Field(
        True,
        description="ComfyUI services: once ComfyUI is up and the model files are present, "
        "run one small prompt of the service's own workflow so that ComfyUI loads the "
        "models; `/ready` is 200 only after it (stage `warming up`), and the first job pays "
        "no load time. A failed warm-up is logged and the service becomes ready anyway.",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`auto`: readable in a terminal, JSON otherwise (containers)."
    )
    job_log_lines: int = Field(
        500,
        ge=0,
        le=100_000,
        description="Lines of a job's own log kept with it (GET /v1/jobs/{id}/logs: the "
        "service's, the worker's and ComfyUI's lines while it ran, at LOG_LEVEL; the first "
        "tenth and the most recent rest). 0: none kept.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer keys; when set, every route except /health "
        'and /ready needs `Authorization: Bearer <key>`. A blank key (`" "`, `a,,b`) is '
        "refused at start: unset the variable to run without keys.",
    )
    public_url: str | None = Field(
        None,
        description="Base URL for output links in job records (default: the URL the "
        "request came in on).",
    )
    job_timeout_s: float = Field(1800.0, gt=0, description="Hard limit on one job's run time.")
    job_max_attempts: int = Field(
        2,
        ge=1,
        description="A job that was running when the service died is run again until it "
        "has been started this many times; then it fails with code `interrupted` (in a "
        "fleet: `poison`, the pods that ran it died).",
    )
    jobs_ahead: int | None = Field(
        None,
        ge=0,
        le=4,
        description="How many queued jobs the engine takes before the running one ends: "
        "prepared (inputs fetched, decoded, uploaded to ComfyUI, graph queued) so the GPU "
        "starts the next one the moment the last one ends. Default: 1; 0 in a fleet "
        "(QUEUE_URL), where a job taken ahead could wait while another pod is idle: set 1 "
        "there when the queue is always deep.",
    )
    cancel_grace_s: float = Field(
        10.0,
        gt=0,
        description="After a cancel or timeout, how long the worker may take to "
        "stop before it is killed and replaced.",
    )
    max_upload_bytes: int = Field(
        50 * 2**20, gt=0, description="Largest file accepted by POST /v1/uploads."
    )
    max_request_bytes: int = Field(
        80 * 2**20, gt=0, description="Largest request body (JSON with data URIs included)."
    )
    max_fetch_bytes: int = Field(50 * 2**20, gt=0, description="Largest file fetched from a URL.")
    inline_outputs_max_bytes: int = Field(
        8 * 2**20,
        ge=0,
        description="With `Prefer: return=representation`, a finished job's outputs are sent "
        "in the answer (base64 `data`) when together at most this size (0: never).",
    )
    fetch_timeout_s: float = Field(30.0, gt=0, description="Total time allowed for one URL fetch.")
    fetch_allow_networks: Annotated[list[IpNetwork], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated CIDRs that URL fetches and webhooks may reach besides "
        "public addresses (for example `10.0.0.0/8`). Empty: public addresses only.",
    )
    max_audio_s: float = Field(
        60.0, gt=0, description="Longest audio input accepted (seconds), e.g. by InfiniteTalk."
    )
    lora_cache_gb: float = Field(
        20.0,
        gt=0,
        description="Disk cap of the cache of LoRAs that requests name "
        "(MODELS_DIR/loras/cache); least recently used LoRAs are deleted beyond it.",
    )
    civitai_token: SecretStr | None = Field(
        None,
        description="A CivitAI API key (civitai.com, Account settings, API Keys) for LoRAs "
        "given as CivitAI download URLs (`https://civitai.com/api/download/models/<id>`; "
        "many need a login): sent as `Authorization: Bearer` to civitai.com only, not to "
        "the storage it redirects to; never logged or stored with a job.",
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest decoded image (width x height) accepted."
    )
    max_decoded_mb: int = Field(
        512,
        gt=0,
        description="Memory that input images may take decoded (width x height x "
        "channels): one request's images together (beyond it: 413 `decoded_too_large`), "
        "and all requests' being accepted at once (beyond it an image waits its turn).",
    )
    output_retention_hours: float = Field(
        72.0, ge=0, description="Outputs older than this are deleted (0 keeps them forever)."
    )
    job_record_retention_days: float = Field(
        30.0,
        ge=0,
        description="Job records older than this (days since the job finished) are deleted, "
        "with a long video's parts, webhook deliveries and upload records: then GET "
        "/v1/jobs/{id} answers 404 `not_found`, the job is gone from lists, and a PUT with "
        "the same id creates a new job (idempotency holds only this long). Files never "
        "outlive their record: set shorter than OUTPUT_RETENTION_HOURS (or with it 0), "
        "outputs are deleted with the record. 0 keeps records forever.",
    )
    s3_bucket: str | None = Field(
        None,
        description="Upload every output to this S3-compatible bucket; jobs then list the "
        "object URLs. Credentials: the usual AWS_* variables (boto3).",
    )
    s3_prefix: str = Field("outputs/", description="Key prefix of uploaded outputs.")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (R2, MinIO, B2, ...); default AWS."
    )
    s3_region: str | None = Field(None, description="Region of the bucket.")
    s3_presign_s: int = Field(
        0,
        ge=0,
        le=7 * 24 * 3600,
        description="Presigned GET URLs valid this long; 0: plain object URLs (public "
        "buckets, or clients with their own credentials).",
    )
    bucket_endpoint_url: str | None = Field(
        None,
        description="worker-comfyui's S3 variable, read into the S3_* settings: "
        "`https://<bucket>.s3.<region>.amazonaws.com` gives S3_BUCKET and S3_REGION on AWS; "
        "another URL gives S3_ENDPOINT_URL, and S3_BUCKET from its first path segment "
        "(`http://minio:9000/<bucket>`) unless set. Keys are then `<job id>/<name>` "
        "(S3_PREFIX empty) and URLs presigned for 7 days (S3_PRESIGN_S), as worker-comfyui "
        "does, unless those are set.",
    )
    bucket_access_key_id: str | None = Field(
        None, description="With BUCKET_ENDPOINT_URL: the access key id (else AWS_ACCESS_KEY_ID)."
    )
    bucket_secret_access_key: SecretStr | None = Field(
        None,
        description="With BUCKET_ENDPOINT_URL: its secret key (else AWS_SECRET_ACCESS_KEY).",
    )
    queue_url: str | None = Field(
        None,
        description="`redis://host:6379/0`: this process is one pod of a fleet; job records, "
        "events and the model's queue live in this Redis (saq), shared by every pod of the "
        "same service. Unset: the embedded SQLite store, as one machine.",
    )
    queue_heartbeat_s: float = Field(
        30.0,
        ge=1,
        description="A fleet pod beats for its running job this often (a third of it); a "
        "job whose pod stopped beating for this long is taken over by another pod.",
    )
    pod_url: str | None = Field(
        None,
        description="URL at which other pods and clients reach this pod (fleets): output "
        "links of the jobs it ran point here. Default: RunPod's proxy URL of the pod "
        "(RUNPOD_POD_ID), else http://<this host's address>:PORT.",
    )
    runpod_pod_id: str | None = Field(
        None, description="Set by RunPod on its pods; gives the default POD_URL."
    )
    max_queued_jobs: int = Field(
        0,
        ge=0,
        description="Most jobs waiting in the model's queue (the whole fleet's with "
        "QUEUE_URL); beyond it a new job gets 429 `queue_full` with Retry-After. 0: no limit.",
    )
    allow_custom_workflows: bool = Field(
        False,
        description="ComfyUI services: jobs may bring their own API-format workflow "
        "(`input.workflow`). A workflow can run any node installed in ComfyUI: turn it on only "
        "for clients you trust (README: custom workflows).",
    )
    custom_workflow_nodes_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="With ALLOW_CUSTOM_WORKFLOWS: the only node classes a workflow may use "
        "(comma-separated). Empty: every installed class not denied.",
    )
    custom_workflow_nodes_deny: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="With ALLOW_CUSTOM_WORKFLOWS: node classes a workflow may not use "
        "(comma-separated).",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing secret (`whsec_...`); when unset, webhooks "
        "are sent unsigned.",
    )
    webhook_max_attempts: int = Field(8, ge=1, description="Delivery attempts per webhook.")
    webhook_retry_base_s: float = Field(
        2.0, gt=0, description="First retry delay; doubles per attempt, with jitter."
    )
    webhook_timeout_s: float = Field(15.0, gt=0, description="Time allowed per webhook attempt.")

    @model_validator(mode="before")
    @classmethod
    def _bucket_endpoint(cls, data: object) -> object:
        """worker-comfyui's BUCKET_ENDPOINT_URL as the S3_* settings it stands for (those
        set explicitly win)."""
        if not isinstance(data, dict) or not data.get("bucket_endpoint_url"):
            return data
        merged = {**bucket_settings(str(data["bucket_endpoint_url"])), **data}
        if not merged.get("s3_bucket"):
            raise ValueError(
                "BUCKET_ENDPOINT_URL names no bucket: give it as "
                "https://<bucket>.s3.<region>.amazonaws.com or <endpoint>/<bucket>, or set "
                "S3_BUCKET"
            )
        return merged

    @field_validator("custom_workflow_nodes_allow", "custom_workflow_nodes_deny", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        """Keys, each non-blank: a blank one (a templating slip: `" "`, `","`) would
        otherwise leave the service open without a word."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            if value:  # set, but to blanks
                raise ValueError(
                    "API_KEYS is set but holds no key (only spaces); unset it to run "
                    "without keys, or give comma-separated keys"
                )
            return []
        keys = [item.strip() for item in value.split(",")]
        if not all(keys):
            raise ValueError(
                "API_KEYS holds a blank key (an empty item between commas); give "
                "comma-separated keys without empty items"
            )
        return keys

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _secret(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            if value:
                raise ValueError("WEBHOOK_SECRET is set but blank; unset it or give a secret")
            return None
        return value

    @field_validator("fetch_allow_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        items = _split_csv(value)
        if isinstance(items, list):
            return [ipaddress.ip_network(str(item), strict=False) for item in items]
        return items

    def secret_values(self) -> list[str]:
        """Every secret this process knows, for the log redactor: the settings' own, and
        credentials that libraries read from the environment themselves."""
        values = [key.get_secret_value() for key in self.api_keys]
        if self.webhook_secret is not None:
            values.append(self.webhook_secret.get_secret_value())
        if self.civitai_token is not None:
            values.append(self.civitai_token.get_secret_value())
        if self.bucket_secret_access_key is not None:
            values.append(self.bucket_secret_access_key.get_secret_value())
        values += [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]
        return values

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def effective_jobs_ahead(self) -> int:
        """JOBS_AHEAD, or its default: 1 on one machine, 0 in a fleet."""
        if self.jobs_ahead is not None:
            return self.jobs_ahead
        return 0 if self.queue_url else 1

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"
