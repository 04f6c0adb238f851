"""A fleet's input files, uploads and long-video parts' outputs, kept in Redis so that
any pod can run any job.

The pod that takes a request fetches and checks the job's input files as always, and
puts them here before the job is stored; the pod that runs it writes them to its own
disk first. A long video's parts use their parent's input files (its start image, its
images) and each other's outputs (a segment's last frame; every part's video for the
stitch): a part's outputs are put here before it is recorded as succeeded, and the pod
that needs one writes it to its own disk, at the path it has on the pod that made it
(`<DATA_DIR>/jobs/<id>/outputs/<name>`). Uploads (`POST /v1/uploads`) are kept here too.
These are images, audio and short clips of a few MB each, well within what Redis holds;
all expire after OUTPUT_RETENTION_HOURS (a job retried later than that fails with
`input_missing`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from model_service.errors import InputMissing
from model_service.jobs.record import Job


class SharedFiles:
    def __init__(
        self, url: str, namespace: str, ttl_s: int, job_dir: Callable[[str], Path]
    ) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        self._namespace = namespace
        self._ttl_s = ttl_s  # 0: kept
        self._job_dir = job_dir  # where a job's files are on this pod

    def _inputs_key(self, job_id: str) -> str:
        return f"{self._namespace}:input-files:{job_id}"

    def _outputs_key(self, job_id: str) -> str:
        return f"{self._namespace}:output-files:{job_id}"

    def _upload_key(self, upload_id: str) -> str:
        return f"{self._namespace}:upload-data:{upload_id}"

    async def close(self) -> None:
        await self._redis.aclose()

    async def put_inputs(self, job_id: str, inputs_dir: Path) -> None:
        files = await asyncio.to_thread(_read_files, inputs_dir)
        await self._put(self._inputs_key(job_id), files)

    async def put_outputs(self, job_id: str, output_dir: Path, names: list[str]) -> None:
        files = await asyncio.to_thread(_read_files, output_dir, names)
        await self._put(self._outputs_key(job_id), files)

    async def _put(self, key: str, files: dict[str, bytes]) -> None:
        if files:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=files)
                if self._ttl_s:
                    pipe.expire(key, self._ttl_s)
                await pipe.execute()

    async def local_inputs(self, job: Job) -> dict[str, Any]:
        """The job's prepared input with its files (its own, or its parent's: a long
        video's part) written to this pod's disk, their paths made this pod's paths."""
        owners = [job.id] + ([job.parent_id] if job.parent_id else [])
        for owner, name in _input_files(job.prepared_input, owners):
            target = self._job_dir(owner) / "inputs" / name
            if target.is_file():
                continue
            content = await self._redis.hget(self._inputs_key(owner), name)  # type: ignore[misc]
            if content is None:
                raise InputMissing(
                    f"input file {name} of job {owner} is no longer in the fleet's store "
                    "(deleted by retention); submit the job again",
                    source_job=owner,
                )
            await asyncio.to_thread(_write_file, target, content)
        return {
            key: _relocate(value, owners, self._job_dir)
            for key, value in job.prepared_input.items()
        }

    async def local_outputs(self, job_id: str, names: list[str]) -> list[str]:
        """Writes `names` of `job_id`'s shared outputs to this pod's disk (where they are
        not yet); returns the names the fleet does not hold."""
        output_dir = self._job_dir(job_id) / "outputs"
        missing = [name for name in names if not (output_dir / name).is_file()]
        if not missing:
            return []
        data = await self._redis.hmget(self._outputs_key(job_id), missing)  # type: ignore[misc]
        absent = []
        for name, content in zip(missing, data, strict=True):
            if content is None:
                absent.append(name)
            else:
                await asyncio.to_thread(_write_file, output_dir / name, content)
        return absent

    async def save_upload(self, upload_id: str, path: Path) -> None:
        data = await asyncio.to_thread(path.read_bytes)
        await self._redis.set(self._upload_key(upload_id), data, ex=self._ttl_s or None)

    async def read_upload(self, upload_id: str) -> bytes | None:
        data: bytes | None = await self._redis.get(self._upload_key(upload_id))
        return data


def _read_files(folder: Path, names: list[str] | None = None) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    paths = folder.iterdir() if names is None else (folder / name for name in names)
    return {path.name: path.read_bytes() for path in paths if path.is_file()}


def _write_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")  # never a half-written file at `path`
    partial.write_bytes(content)
    partial.replace(path)


def _owner(value: Any, owners: list[str]) -> str | None:
    """Which of `owners` a path `.../jobs/<owner>/inputs/<name>` belongs to, if any."""
    if not isinstance(value, str) or "/" not in value:
        return None
    path = Path(value)
    if path.parent.name != "inputs" or path.parent.parent.name not in owners:
        return None
    return path.parent.parent.name


def _input_files(value: Any, owners: list[str]) -> list[tuple[str, str]]:
    """(owner, file name) of each input file path in `value` (a prepared input: values,
    lists of them, and dicts: a custom workflow's `files`)."""
    if isinstance(value, dict):
        return [found for item in value.values() for found in _input_files(item, owners)]
    if isinstance(value, list):
        return [found for item in value for found in _input_files(item, owners)]
    owner = _owner(value, owners)
    return [] if owner is None else [(owner, Path(value).name)]


def _relocate(value: Any, owners: list[str], job_dir: Callable[[str], Path]) -> Any:
    if isinstance(value, dict):
        return {key: _relocate(item, owners, job_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_relocate(item, owners, job_dir) for item in value]
    owner = _owner(value, owners)
    if owner is None:
        return value
    return str((job_dir(owner) / "inputs" / Path(value).name).resolve())
