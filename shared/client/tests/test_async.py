"""The asyncio client against the real echo service: the same core flow as the blocking one."""

import asyncio
from pathlib import Path

import pytest

from client_testing import KEY, fetch, pixel, png_bytes
from model_service_client import AsyncClient, Job, JobFailed, ServiceError
from model_service_testing.process import ServiceProcess


def test_async_client_core_flow(service: ServiceProcess, tmp_path: Path) -> None:
    async def flow() -> None:
        async with AsyncClient(service.url, KEY) as client:
            # upload, submit, wait with progress, download
            image = await client.upload(png_bytes((0, 255, 0)), filename="green.png")
            job = await client.submit({"image": image, "text": "async", "steps": 4, "step_s": 0.05})
            seen: list[Job] = []
            done = await client.wait(job.id, on_progress=seen.append, timeout=30)
            assert done.status == "succeeded"
            assert any(0 < j.progress < 1 for j in seen)
            assert seen[-1].status == "succeeded"
            files = await client.download(done, tmp_path)
            by_name = {p.name: p.read_bytes() for p in files}
            assert pixel(by_name["out.png"]) == (255, 0, 255)  # green, inverted
            for output in done.outputs:
                assert by_name[output.name] == fetch(output.url or "")
            # events
            streamed = await client.submit({"steps": 3, "step_s": 0.02})
            events = [event async for event in client.events(streamed.id)]
            assert events[-1].job.status == "succeeded"
            assert [e.job.raw["progress"]["step"] for e in events if e.kind == "progress"][-1] == 3
            # get, list, PUT with an id and Prefer: wait
            assert (await client.get(job.id)).raw["input"]["text"] == "async"
            put = await client.submit({"text": "put"}, job_id="async-put-1", wait_s=30)
            assert (put.id, put.status) == ("async-put-1", "succeeded")
            page = await client.list(limit=1)
            assert [j.id for j in page.jobs] == ["async-put-1"]
            assert page.next_cursor is not None
            # cancel, a failure, retry
            long = await client.submit({"steps": 200, "step_s": 0.05})
            await client.cancel(long.id)
            assert (await client.wait(long.id, timeout=15)).status == "canceled"
            failing = await client.submit({"behaviour": "oom"})
            with pytest.raises(JobFailed) as failed:
                await client.wait(failing.id, timeout=30, raise_on_failure=True)
            assert failed.value.code == "out_of_memory"
            assert (await client.retry(failing.id)).status == "queued"
            assert (await client.wait(failing.id, timeout=30)).status == "failed"
            # errors
            with pytest.raises(ServiceError) as bad:
                await client.submit({"text": 5})
            assert (bad.value.status_code, bad.value.code) == (422, "invalid_input")
            assert "input.text" in bad.value.message
            with pytest.raises(ServiceError) as missing:
                await anext(aiter(client.events("no-such-job")))
            assert missing.value.code == "not_found"
        async with AsyncClient(service.url) as anonymous:
            with pytest.raises(ServiceError) as unauthorized:
                await anonymous.get(job.id)
            assert (unauthorized.value.status_code, unauthorized.value.code) == (
                401,
                "unauthorized",
            )

    asyncio.run(flow())
