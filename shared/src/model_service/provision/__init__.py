"""Model provisioning: put a service's weight files under MODELS_DIR, once, verified.

`Manifest` lists the files (see `manifest.py` for the JSON format); `provision()`
downloads what is missing (see `download.py`); `model-service download --manifest ...`
does the same from the command line.
"""

from model_service.errors import ProvisionError
from model_service.provision.download import (
    FileResult,
    ProgressCallback,
    ProvisionMetrics,
    ProvisionReport,
    check_disk_space,
    provision,
)
from model_service.provision.lock import FileLock
from model_service.provision.manifest import HubSource, Manifest, ModelFile, Source, UrlSource

__all__ = [
    "FileLock",
    "FileResult",
    "HubSource",
    "Manifest",
    "ModelFile",
    "ProgressCallback",
    "ProvisionError",
    "ProvisionMetrics",
    "ProvisionReport",
    "Source",
    "UrlSource",
    "check_disk_space",
    "provision",
]
