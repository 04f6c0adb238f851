"""Weight files, model files and LoRAs alike: where they come from and one download.

- `sources`: a LoRA's source (`hf://`, an https URL, a CivitAI download URL).
- `fetch`: one file from the Hub or a URL into a staging path (resumable), verified
  (size, sha256, safetensors header); one error mapping (`DownloadFailed`); progress;
  the operator's tokens (`HF_TOKEN`, `CIVITAI_TOKEN`), sent only to their own hosts.

Built on it: model provisioning (`model_service.provision`: a manifest's files, locked
across pods) and the LoRA cache (`model_service.loras`: LRU, pins per job).
"""

from model_service.weights.fetch import (
    DownloadFailed,
    PlainOpener,
    Progress,
    Stopped,
    Tokens,
    Verified,
    download_url,
    hub_download,
    verify,
)
from model_service.weights.sources import LoraSource, parse_lora_source

__all__ = [
    "DownloadFailed",
    "LoraSource",
    "PlainOpener",
    "Progress",
    "Stopped",
    "Tokens",
    "Verified",
    "download_url",
    "hub_download",
    "parse_lora_source",
    "verify",
]
