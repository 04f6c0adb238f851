"""A fleet's input files and uploads, kept in Redis so that any pod can run any job.

The pod that takes a request fetches and checks the job's input files as always, and
puts them here before the job is stored; the pod that runs it writes them to its own
disk first. Uploads (`POST /v1/uploads`) are kept here for OUTPUT_RETENTION_HOURS.
Inputs are images and audio of a few MB each, well within what Redis holds; both expire
after OUTPUT_RETENTION_HOURS (a job retried later than that fails with `input_missing`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from model_service.errors import InputMissing
from model_service.jobs.record import Job


class SharedFiles:
    def __init__(self, url: str, namespace: str, ttl_s: int) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        self._namespace = namespace
        self._ttl_s = ttl_s  # 0: kept

    def _inputs_key(self, job_id: str) -> str:
        return f"{self._namespace}:input-files:{job_id}"

    def _upload_key(self, upload_id: str) -> str:
        return f"{self._namespace}:upload-data:{upload_id}"

    async def close(self) -> None:
        await self._redis.aclose()

    async def put_inputs(self, job_id: str, inputs_dir: Path) -> None:
        files = await asyncio.to_thread(_read_files, inputs_dir)
        if files:
            key = self._inputs_key(job_id)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=files)
                if self._ttl_s:
                    pipe.expire(key, self._ttl_s)
                await pipe.execute()

    async def local_inputs(self, job: Job, inputs_dir: Path) -> dict[str, Any]:
        """The job's prepared input with its files written under `inputs_dir` (paths of
        the pod that took the request become paths here)."""
        names = _input_names(job)
        if not names:
            return dict(job.prepared_input)
        missing = [name for name in names if not (inputs_dir / name).is_file()]
        if missing:
            data = await self._redis.hmget(self._inputs_key(job.id), missing)  # type: ignore[misc]
            for name, content in zip(missing, data, strict=True):
                if content is None:
                    raise InputMissing(
                        f"input file {name} of job {job.id} is no longer in the fleet's store "
                        "(deleted by retention); submit the job again",
                        source_job=job.id,
                    )
                await asyncio.to_thread(_write_file, inputs_dir / name, content)
        return {
            key: _relocate(value, job.id, inputs_dir) for key, value in job.prepared_input.items()
        }

    async def save_upload(self, upload_id: str, path: Path) -> None:
        data = await asyncio.to_thread(path.read_bytes)
        await self._redis.set(self._upload_key(upload_id), data, ex=self._ttl_s or None)

    async def read_upload(self, upload_id: str) -> bytes | None:
        data: bytes | None = await self._redis.get(self._upload_key(upload_id))
        return data


def _read_files(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def _write_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _is_input_path(value: Any, job_id: str) -> bool:
    if not isinstance(value, str) or "/" not in value:
        return False
    path = Path(value)
    return path.parent.name == "inputs" and path.parent.parent.name == job_id


def _input_names(job: Job) -> list[str]:
    names = []
    for value in job.prepared_input.values():
        for item in value if isinstance(value, list) else [value]:
            if _is_input_path(item, job.id):
                names.append(Path(item).name)
    return names


def _relocate(value: Any, job_id: str, inputs_dir: Path) -> Any:
    if isinstance(value, list):
        return [_relocate(item, job_id, inputs_dir) for item in value]
    if _is_input_path(value, job_id):
        return str((inputs_dir / Path(value).name).resolve())
    return value
