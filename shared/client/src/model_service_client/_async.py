"""The asyncio clients: `AsyncClient` and `AsyncRunpodClient` (the same methods as the
blocking ones, awaited)."""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
from httpx_sse import aconnect_sse

from model_service_client import _core
from model_service_client._core import (
    BearerAuth,
    Job,
    JobEvent,
    JobPage,
    ProgressCallback,
    Segment,
    ServiceError,
    Waiter,
)


class _AsyncBase:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, fleet: bool) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=base_url, auth=BearerAuth(api_key, base_url, fleet), timeout=timeout
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = await self._http.request(method, url, **kwargs)
        if response.is_error:
            raise ServiceError.from_response(response)
        return response

    async def download(
        self, job: Job | str, dest_dir: str | os.PathLike[str]
    ) -> builtins.list[Path]:
        """Writes each output of `job` (or of the job with this id) to `dest_dir`; returns
        the files. Follows redirects (a fleet pod sends you to the pod that holds them)."""
        if isinstance(job, str):
            job = await self.get(job)
        dest = Path(dest_dir)
        paths = []
        for output in job.outputs:
            target = _core.output_target(dest, output.name)
            if output.data is not None:
                await asyncio.to_thread(_core.write_file, target, output.data)
            elif output.url is not None:
                await self._fetch(output.url, target)
            else:
                continue
            paths.append(target)
        return paths

    async def get(self, job_id: str) -> Job:
        raise NotImplementedError

    async def _fetch(self, url: str, target: Path) -> None:
        for _ in range(_core.MAX_REDIRECTS + 1):
            async with self._http.stream("GET", url) as response:
                next_url = _core.redirect_url(response)
                if next_url is not None:
                    url = next_url
                    continue
                if response.is_error:
                    await response.aread()
                    raise ServiceError.from_response(response)
                part = _core.part_path(target)
                try:
                    with _core.open_part(target) as out:
                        async for chunk in response.aiter_bytes():
                            out.write(chunk)
                except BaseException:
                    part.unlink(missing_ok=True)
                    raise
                part.replace(target)
                return
        raise ServiceError(None, "too_many_redirects", f"more than {_core.MAX_REDIRECTS}: {url}")


class AsyncClient(_AsyncBase):
    """`Client`, for asyncio: the `/v1/jobs` API of a model service."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = _core.DEFAULT_TIMEOUT_S,
    ) -> None:
        url = _core.service_url(base_url)
        super().__init__(url, _core.env_key(api_key, _core.KEY_ENV), timeout, fleet=True)

    async def submit(
        self,
        input: dict[str, Any],
        *,
        job_id: str | None = None,
        webhook: str | None = None,
        wait_s: float = 0,
    ) -> Job:
        """Creates a job (`job_id`: your own id, PUT: repeating it is safe). `wait_s`
        (at most 90): the answer waits that long for the job to finish."""
        method, path, body, headers = _core.submit_request(input, job_id, webhook, wait_s)
        response = await self._request(
            method, path, json=body, headers=headers, timeout=self.timeout + wait_s
        )
        return Job.from_json(response.json())

    async def chain(
        self,
        input: dict[str, Any],
        segments: Sequence[Segment],
        *,
        interactive: bool | None = None,
        colour_correction: bool | None = None,
        colour_strength: float | None = None,
        job_id: str | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        storage: dict[str, Any] | None = None,
        wait_s: float = 0,
    ) -> Job:
        """Creates a chain (a long video; image-to-video services): `input` as for
        `submit`, with the start image, holds what every segment shares; `segments`, in
        order, each a prompt or an object of its own fields (`prompt`, `num_frames`,
        `seed`, ...), each starting from the last frame of the one before. `interactive`:
        the chain then waits in `awaiting_input` for `add_segments`, `delete_last_segment`
        or `finalize`. Options left None take the service's defaults. Returns the chain's
        job: `wait`, `events`, `cancel`, `retry` and `download` (the final video) work on
        it as on any job."""
        body = _core.long_video_body(
            input=input,
            segments=_core.segments_of(segments),
            interactive=interactive,
            colour_correction=colour_correction,
            colour_strength=colour_strength,
            webhook=webhook,
            webhook_events=None if webhook_events is None else [*webhook_events],
            storage=storage,
        )
        return await self._create("/v1/chains", body, job_id, wait_s)

    async def travel(
        self,
        input: dict[str, Any],
        images: Sequence[str | os.PathLike[str] | bytes],
        *,
        prompts: Sequence[str] | None = None,
        overlap: int | None = None,
        job_id: str | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        storage: dict[str, Any] | None = None,
        wait_s: float = 0,
    ) -> Job:
        """Creates a travel (a long video between `images`; image-to-video services):
        legs from image to image (Wan2.2-14B: first-last-frame, N-1 legs) or starting at
        each image (FastWan: N legs). An image is a URL, a data URI or an upload id (a
        string), or a local file (a `Path`) or bytes, uploaded first. `prompts`: one per
        leg (default: `input["prompt"]`); `overlap`: frames cross-faded between legs.
        Returns the travel's job, as `chain`."""
        refs = [image if isinstance(image, str) else await self.upload(image) for image in images]
        body = _core.long_video_body(
            input=input,
            images=refs,
            prompts=None if prompts is None else [*prompts],
            overlap=overlap,
            webhook=webhook,
            webhook_events=None if webhook_events is None else [*webhook_events],
            storage=storage,
        )
        return await self._create("/v1/travels", body, job_id, wait_s)

    async def join(
        self,
        clips: Sequence[str | os.PathLike[str] | bytes],
        *,
        input: dict[str, Any] | None = None,
        bridge_frames: int | None = None,
        prompt: str | None = None,
        prompts: Sequence[str] | None = None,
        job_id: str | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        storage: dict[str, Any] | None = None,
        wait_s: float = 0,
    ) -> Job:
        """Joins your `clips` (first-last-frame services: Wan2.2-14B) with `bridge_frames`
        new frames between each two, made from one clip's last frame to the next one's
        first. A clip is a URL, a data URI or an upload id, or a local file or bytes,
        uploaded first. `prompt` (every bridge) or `prompts` (one per bridge); `input`:
        the service's other fields the bridges share. Returns the join's job."""
        refs = [clip if isinstance(clip, str) else await self.upload(clip) for clip in clips]
        body = _core.long_video_body(
            input=input,
            clips=refs,
            bridge_frames=bridge_frames,
            prompt=prompt,
            prompts=None if prompts is None else [*prompts],
            webhook=webhook,
            webhook_events=None if webhook_events is None else [*webhook_events],
            storage=storage,
        )
        return await self._create("/v1/joins", body, job_id, wait_s)

    async def redo(
        self,
        video: str | os.PathLike[str] | bytes,
        start_frame: int,
        end_frame: int,
        *,
        prompt: str | None = None,
        input: dict[str, Any] | None = None,
        job_id: str | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        storage: dict[str, Any] | None = None,
        wait_s: float = 0,
    ) -> Job:
        """Makes frames `start_frame`..`end_frame` (from 0, both included) of `video`
        again (first-last-frame services), from the frame before to the frame after;
        the video keeps its frame count, frame rate and audio. Returns the redo's job."""
        ref = video if isinstance(video, str) else await self.upload(video)
        body = _core.long_video_body(
            input=input,
            video=ref,
            start_frame=start_frame,
            end_frame=end_frame,
            prompt=prompt,
            webhook=webhook,
            webhook_events=None if webhook_events is None else [*webhook_events],
            storage=storage,
        )
        return await self._create("/v1/redos", body, job_id, wait_s)

    async def add_segments(self, job_id: str, segments: Sequence[Segment]) -> Job:
        """Interactive chain: queues the next segment(s) (prompts or objects)."""
        body = {"segments": _core.segments_of(segments)}
        path = _core.chain_path(job_id, "/segments")
        return Job.from_json((await self._request("POST", path, json=body)).json())

    async def delete_last_segment(self, job_id: str) -> Job:
        """Interactive chain awaiting input: deletes its last segment (to redo it)."""
        path = _core.chain_path(job_id, "/segments/last")
        return Job.from_json((await self._request("DELETE", path)).json())

    async def finalize(self, job_id: str) -> Job:
        """Interactive chain: stitches its segments into the final video."""
        path = _core.chain_path(job_id, "/finalize")
        return Job.from_json((await self._request("POST", path)).json())

    async def reopen(self, job_id: str) -> Job:
        """A finished interactive chain: awaits input again, to add segments."""
        path = _core.chain_path(job_id, "/reopen")
        return Job.from_json((await self._request("POST", path)).json())

    async def _create(
        self, collection: str, body: dict[str, Any], job_id: str | None, wait_s: float
    ) -> Job:
        method, path, body, headers = _core.create_request(collection, body, job_id, wait_s)
        response = await self._request(
            method, path, json=body, headers=headers, timeout=self.timeout + wait_s
        )
        return Job.from_json(response.json())

    async def get(self, job_id: str) -> Job:
        return Job.from_json((await self._request("GET", _core.job_path(job_id))).json())

    async def logs(self, job_id: str) -> dict[str, Any]:
        """The job's own log: `{"job_id", "status", "complete", "lines": [...]}`."""
        response = await self._request("GET", _core.job_path(job_id, "/logs"))
        data: dict[str, Any] = response.json()
        return data

    async def list(
        self, status: str | None = None, limit: int = 50, cursor: int | None = None
    ) -> JobPage:
        """Jobs, newest first (`status`: only those)."""
        params = _core.list_params(status, limit, cursor)
        response = await self._request("GET", "/v1/jobs", params=params)
        return _core.page_from_json(response.json())

    async def cancel(self, job_id: str) -> Job:
        """Cancels the job (a running one stops at its next step: `cancel_requested`)."""
        response = await self._request("POST", _core.job_path(job_id, "/cancel"))
        return Job.from_json(response.json())

    async def retry(self, job_id: str) -> Job:
        """Queues a failed or canceled job again (same id, input and seed)."""
        response = await self._request("POST", _core.job_path(job_id, "/retry"))
        return Job.from_json(response.json())

    async def upload(
        self, file: str | os.PathLike[str] | bytes, filename: str | None = None
    ) -> str:
        """Uploads a file (a path, or bytes); returns its id, usable as an input value."""
        name, content, content_type = _core.upload_file(file, filename)
        try:
            files = {"file": (name, content, content_type)}
            response = await self._request("POST", "/v1/uploads", files=files)
            return str(response.json()["id"])
        finally:
            if not isinstance(content, bytes):
                content.close()

    def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's server-sent events (`status`, `progress`), until it is done."""
        return self._events(job_id, httpx.Timeout(self.timeout, read=_core.STREAM_READ_S))

    async def _events(self, job_id: str, timeout: httpx.Timeout) -> AsyncGenerator[JobEvent, None]:
        path = _core.job_path(job_id, "/events")
        async with aconnect_sse(self._http, "GET", path, timeout=timeout) as source:
            if source.response.is_error:
                await source.response.aread()
                raise ServiceError.from_response(source.response)
            async for event in source.aiter_sse():
                if event.data:
                    yield JobEvent(event.event, Job.from_json(event.json()))

    async def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        *,
        raise_on_failure: bool = False,
        poll_s: float = 1.0,
    ) -> Job:
        """As `Client.wait`: the job once it is done (or awaits input)."""
        waiter = Waiter(job_id, on_progress, timeout, raise_on_failure, poll_s)
        while True:
            try:
                events = self._events(job_id, waiter.stream_timeout(self.timeout))
                try:
                    async for event in events:
                        if waiter.seen(event.job):
                            return event.job
                finally:
                    await events.aclose()
                job = await self.get(job_id)  # the stream ended early
                if waiter.seen(job):
                    return job
            except httpx.TransportError as exc:
                waiter.unreachable(exc)
            await asyncio.sleep(waiter.pause())


class AsyncRunpodClient(_AsyncBase):
    """`RunpodClient`, for asyncio: a RunPod serverless endpoint running a model service."""

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        timeout: float = _core.DEFAULT_TIMEOUT_S,
    ) -> None:
        url = _core.runpod_url(endpoint)
        super().__init__(url, _core.env_key(api_key, _core.RUNPOD_KEY_ENV), timeout, fleet=False)
        self._status_method = "GET"  # RunPod's; the dev server answers POST only

    async def submit(
        self, input: dict[str, Any], *, webhook: str | None = None, wait_s: float = 0
    ) -> Job:
        """`/run`; with `wait_s`, `/runsync` waiting up to that long (1 to 300 s)."""
        path, body, params, timeout = _core.runpod_submit_request(
            input, webhook, wait_s, self.timeout
        )
        response = await self._request("POST", path, json=body, params=params, timeout=timeout)
        return Job.from_runpod(response.json())

    async def get(self, job_id: str) -> Job:
        path = f"/status/{quote(job_id, safe='')}"
        response = await self._http.request(self._status_method, path)
        if response.status_code == 405 and self._status_method == "GET":
            self._status_method = "POST"
            response = await self._http.request("POST", path)
        if response.is_error:
            raise ServiceError.from_response(response)
        return Job.from_runpod(response.json())

    async def cancel(self, job_id: str) -> Job:
        response = await self._request("POST", f"/cancel/{quote(job_id, safe='')}")
        return Job.from_runpod(response.json())

    async def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        *,
        raise_on_failure: bool = False,
        poll_s: float = 1.0,
    ) -> Job:
        """Polls `/status` until the job is done; as `Client.wait`."""
        waiter = Waiter(job_id, on_progress, timeout, raise_on_failure, poll_s)
        while True:
            try:
                job = await self.get(job_id)
            except httpx.TransportError as exc:
                waiter.unreachable(exc)
            else:
                if waiter.seen(job):
                    return job
            await asyncio.sleep(waiter.pause())
