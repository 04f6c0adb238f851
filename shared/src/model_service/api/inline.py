"""Outputs in the answer itself (`Prefer: return=representation`): a client that asked
for a small image gets it with the job, with no second request."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service.jobs.view import JobView
from model_service.offloop import off_loop
from model_service.settings import Settings

_PREFER_INLINE = re.compile(r"(?:^|[,;\s])return\s*=\s*representation\b", re.IGNORECASE)


def prefers_inline(prefer: str | None) -> bool:
    return bool(_PREFER_INLINE.search(prefer or ""))


async def with_inline_outputs(
    view: JobView, job: Job, settings: Settings, pod_url: str | None
) -> JobView | None:
    """`view` with every output's `data`, or None when they cannot be sent inline (not
    succeeded, too large, held by another pod, deleted by retention)."""
    if job.status is not JobStatus.SUCCEEDED or job.outputs_expired or not view.outputs:
        return None
    if pod_url and job.held_by and job.held_by != pod_url:
        return None  # a fleet: another pod holds the files
    folder = settings.job_dir(job.id) / "outputs"
    try:
        sizes = [(folder / output.name).stat().st_size for output in view.outputs]
    except OSError:
        return None
    if sum(sizes) > settings.inline_outputs_max_bytes:  # left to their URLs
        return None
    total = sum(sizes)  # encoded here when small, in a thread when large (off_loop)
    try:
        data = [
            await off_loop(total, _data_uri, folder / output.name, output.content_type)
            for output in view.outputs
        ]
    except OSError:  # deleted meanwhile
        return None
    pairs = zip(view.outputs, data, strict=True)
    outputs = [output.model_copy(update={"data": uri}) for output, uri in pairs]
    return view.model_copy(update={"outputs": outputs})


def _data_uri(path: Path, content_type: str | None) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{content_type or 'application/octet-stream'};base64,{encoded}"
