"""Client (sync and async) for the model services' `/v1/jobs` API and their RunPod
serverless endpoints; the `msc` command line is `model_service_client.cli`."""

from model_service_client._async import AsyncClient, AsyncRunpodClient
from model_service_client._core import Job, JobEvent, JobFailed, JobPage, Output, ServiceError
from model_service_client._sync import Client, RunpodClient

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncRunpodClient",
    "Client",
    "Job",
    "JobEvent",
    "JobFailed",
    "JobPage",
    "Output",
    "RunpodClient",
    "ServiceError",
]
