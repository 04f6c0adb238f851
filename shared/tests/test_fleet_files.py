"""A fleet's shared files (a real redis-server): input files put by the pod that took the
request are written, at this pod's paths, by the pod that runs the job; a long video's
parts find their parent's files and each other's outputs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_service.errors import InputMissing
from model_service.fleet.files import SharedFiles
from model_service.jobs.record import Job
from model_service.jobs.status import JobStatus
from model_service_testing.process import RedisServer


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def job(job_id: str, prepared: dict[str, object], parent_id: str | None = None) -> Job:
    return Job(
        id=job_id,
        status=JobStatus.QUEUED,
        input={},
        prepared_input=prepared,
        seed=None,
        request_hash="h",
        parent_id=parent_id,
    )


def test_inputs_reach_the_running_pod_at_its_own_paths(redis: RedisServer, tmp_path: Path) -> None:
    pod_a, pod_b = tmp_path / "a" / "jobs", tmp_path / "b" / "jobs"

    async def main() -> None:
        a = SharedFiles(redis.url, "ms:t", 60, lambda job_id: pod_a / job_id)
        b = SharedFiles(redis.url, "ms:t", 60, lambda job_id: pod_b / job_id)
        try:
            for owner, name, data in [
                ("j1", "file_photo.png", b"photo"),
                ("j1", "image_0.png", b"typed"),
                ("lv", "start_image.png", b"start"),
            ]:
                (pod_a / owner / "inputs").mkdir(parents=True, exist_ok=True)
                (pod_a / owner / "inputs" / name).write_bytes(data)
            await a.put_inputs("j1", pod_a / "j1" / "inputs")
            await a.put_inputs("lv", pod_a / "lv" / "inputs")

            own = str(pod_a / "j1" / "inputs")
            custom = job(
                "j1",
                {
                    "workflow": {
                        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
                    },
                    "files": {"p.png": f"{own}/file_photo.png"},
                    "images": [f"{own}/image_0.png"],
                },
            )
            local = await b.local_inputs(custom)
            assert local["files"]["p.png"] == str(pod_b / "j1" / "inputs" / "file_photo.png")
            assert (pod_b / "j1" / "inputs" / "file_photo.png").read_bytes() == b"photo"
            assert local["images"] == [str(pod_b / "j1" / "inputs" / "image_0.png")]
            assert local["workflow"] == custom.prepared_input["workflow"]  # untouched

            part = job(
                "lv.0", {"start_image": str(pod_a / "lv" / "inputs" / "start_image.png")}, "lv"
            )
            local = await b.local_inputs(part)
            assert local["start_image"] == str(pod_b / "lv" / "inputs" / "start_image.png")
            assert Path(local["start_image"]).read_bytes() == b"start"

            (pod_a / "lv.0" / "outputs").mkdir(parents=True)
            (pod_a / "lv.0" / "outputs" / "video.mp4").write_bytes(b"mp4")
            await a.put_outputs("lv.0", pod_a / "lv.0" / "outputs", ["video.mp4"])
            assert await b.local_outputs("lv.0", ["video.mp4", "gone.png"]) == ["gone.png"]
            assert (pod_b / "lv.0" / "outputs" / "video.mp4").read_bytes() == b"mp4"

            stranger = job(
                "j2", {"image": str(tmp_path / "x" / "jobs" / "j2" / "inputs" / "a.png")}
            )
            with pytest.raises(InputMissing):
                await b.local_inputs(stranger)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
