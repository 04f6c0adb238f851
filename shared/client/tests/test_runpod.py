"""The RunPod clients against the echo service as a RunPod worker (MODE=serverless), served
by the runpod SDK's own local dev server (`--rp_serve_api`: `/run`, `/runsync`, `/status`;
it has no `/cancel`, and runs a job during its first `/status` request)."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client_testing import pixel
from model_service_client import AsyncRunpodClient, Job, JobFailed, RunpodClient, ServiceError
from model_service_testing.process import free_port


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The dev server's URL (as shared/tests/test_serverless.py starts it)."""
    root = tmp_path_factory.mktemp("runpod")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")},
        "MODE": "serverless",
        "DATA_DIR": str(root / "data"),
        "LOG_FORMAT": "json",
        "JOB_TIMEOUT_S": "60",
        "RUNPOD_SKIP_GPU_CHECK": "true",
    }
    args = ["--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"]
    log_path = root / "worker.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "model_service_testing.echo.serve", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # the dev server has no /health
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_runpod_submit_wait_and_download(dev_server: str, tmp_path: Path) -> None:
    with RunpodClient(dev_server, timeout=60) as client:
        job = client.submit({"text": "from runpod", "steps": 3, "seed": 11})
        assert job.id.startswith("test-")  # the dev server's ids
        assert job.status == "running"  # IN_PROGRESS
        seen: list[Job] = []
        done = client.wait(job.id, on_progress=seen.append, timeout=60)
        assert done.status == "succeeded"
        assert done.progress == 1.0
        assert seen[-1] is done
        assert done.raw["status"] == "COMPLETED"
        assert done.raw["output"]["seed"] == 11
        outputs = {out.name: out for out in done.outputs}
        assert set(outputs) == {"out.png", "text.txt"}
        assert outputs["text.txt"].data == b"from runpod"  # inline base64, decoded
        assert outputs["text.txt"].url is None
        assert outputs["out.png"].content_type == "image/png"
        files = client.download(done, tmp_path)
        assert {p.name: p.read_bytes() for p in files} == {
            name: out.data for name, out in outputs.items()
        }
        assert pixel((tmp_path / "out.png").read_bytes()) == (11, 0, 0)  # drawn from the seed


def test_runpod_runsync_failures_and_what_the_dev_server_lacks(dev_server: str) -> None:
    with RunpodClient(dev_server, timeout=60) as client:
        quick = client.submit({"text": "sync"}, wait_s=30)  # /runsync
        assert quick.status == "succeeded"
        assert {out.name: out.data for out in quick.outputs}["text.txt"] == b"sync"
        bad = client.submit({"steps": 0})
        with pytest.raises(JobFailed) as info:
            client.wait(bad.id, timeout=60, raise_on_failure=True)
        assert info.value.code == "invalid_input"  # our error, from the handler's JSON string
        assert "input.steps" in info.value.message
        assert info.value.details["field"] == "input.steps"
        assert info.value.job.raw["status"] == "FAILED"
        # the dev server forgets a job once its /status ran it; RunPod's own errors are kept
        gone = client.get(bad.id)
        assert gone.status == "failed"
        assert gone.error == {"code": "runpod_error", "message": "Job ID not found"}
        with pytest.raises(ServiceError) as no_cancel:
            client.cancel(quick.id)
        assert (no_cancel.value.status_code, no_cancel.value.code) == (404, "not_found")


def test_async_runpod_client(dev_server: str) -> None:
    async def flow() -> Job:
        async with AsyncRunpodClient(dev_server, timeout=60) as client:
            job = await client.submit({"text": "async runpod"})
            return await client.wait(job.id, timeout=60, raise_on_failure=True)

    done = asyncio.run(flow())
    assert done.status == "succeeded"
    assert {out.name: out.data for out in done.outputs}["text.txt"] == b"async runpod"


def test_runpod_endpoint_id_or_url() -> None:
    with RunpodClient("abc123xyz", api_key="rp-key") as client:
        assert client.base_url == "https://api.runpod.ai/v2/abc123xyz"
    with pytest.raises(ValueError, match="endpoint"):
        RunpodClient("not/an id")
