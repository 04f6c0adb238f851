"""`msc`: a model service's job API from the command line.

JSON goes to stdout, progress bars and errors to stderr. An error prints the API's code and
message on one line and exits 1; so does a job that failed or was canceled (`--wait`,
`wait`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from model_service_client._core import KEY_ENV, URL_ENV, Job, ServiceError
from model_service_client._sync import Client

app = typer.Typer(
    name="msc",
    help="Submit, follow and download a model service's jobs (its /v1/jobs API).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class _Options:
    url: str | None
    key: str | None


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", envvar=URL_ENV, help="The service, e.g. http://127.0.0.1:8000"),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", envvar=KEY_ENV, help="API key (one of the service's API_KEYS)"),
    ] = None,
) -> None:
    ctx.obj = _Options(url, key)


_InputArg = Annotated[str, typer.Argument(help="The job's input: a JSON object")]
_FileOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--file",
        "-f",
        help="KEY=PATH: upload PATH and put its upload id in the input under KEY "
        "(KEY[]=PATH: appended to a list). Repeatable.",
    ),
]
_WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait for the job, with a progress bar")]
_IdOpt = Annotated[str | None, typer.Option("--id", help="Your own job id (repeating it is safe)")]
_WebhookOpt = Annotated[
    str | None, typer.Option("--webhook", help="https URL called on the job's events")
]
_OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Wait, then download the outputs (the final video) to this folder"
    ),
]


@app.command()
def submit(
    ctx: typer.Context,
    input: _InputArg = "{}",
    file: _FileOpt = None,
    wait: _WaitOpt = False,
    job_id: _IdOpt = None,
) -> None:
    """Create a job; print it as JSON."""
    data = _json_object(input, "the input")
    files = [_file_option(option) for option in file or []]
    with _client(ctx) as client:
        _add_files(client, data, files)
        job = client.submit(data, job_id=job_id)
        if wait:
            job = _follow(client, job.id)
    _print_job(job)


@app.command()
def chain(
    ctx: typer.Context,
    input: Annotated[
        str,
        typer.Argument(
            help="The input every segment shares (as for submit), with the start image: "
            "a JSON object"
        ),
    ] = "{}",
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="One segment with this prompt. Repeatable, in order."),
    ] = None,
    segment: Annotated[
        list[str] | None,
        typer.Option(
            "--segment",
            "-s",
            help="One segment: a JSON object of its own fields (prompt, negative_prompt, "
            "num_frames, seed, loras). Repeatable, in order; not with --prompt.",
        ),
    ] = None,
    file: _FileOpt = None,
    interactive: Annotated[
        bool,
        typer.Option(
            "--interactive",
            help="Await input after the last segment (the console or the API add, delete "
            "and finalize)",
        ),
    ] = False,
    colour_correction: Annotated[
        bool | None,
        typer.Option(
            "--colour-correction/--no-colour-correction",
            help="Match each segment's colours to the start image (the service's default: on)",
            show_default=False,
        ),
    ] = None,
    colour_strength: Annotated[
        float | None,
        typer.Option("--colour-strength", min=0.0, max=1.0, help="0 to 1 (default 1)"),
    ] = None,
    wait: _WaitOpt = False,
    dest: _OutOpt = None,
    job_id: _IdOpt = None,
    webhook: _WebhookOpt = None,
) -> None:
    """Create a chain (a long video: each segment starts from the last frame of the one
    before); print it as JSON."""
    if prompt and segment:
        _fail("give the segments as --prompt or as --segment, not both")
    segments: list[str | dict[str, Any]] = [
        *(prompt or []),
        *(_json_object(text, "--segment") for text in segment or []),
    ]
    if not segments:
        _fail("a chain needs segments: --prompt TEXT (or --segment JSON), once per segment")
    data = _json_object(input, "the input")
    files = [_file_option(option) for option in file or []]
    with _client(ctx) as client:
        _add_files(client, data, files)
        job = client.chain(
            data,
            segments,
            interactive=interactive or None,
            colour_correction=colour_correction,
            colour_strength=colour_strength,
            job_id=job_id,
            webhook=webhook,
        )
        job = _finish(client, job, wait, dest)
    _print_job(job)


@app.command()
def travel(
    ctx: typer.Context,
    input: Annotated[
        str, typer.Argument(help="The input every leg shares (as for submit): a JSON object")
    ] = "{}",
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image",
            "-i",
            help="An image to travel through: a local file (uploaded), an https URL, a data "
            "URI or an upload id. Repeatable, in order; at least 2.",
        ),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt", "-p", help="One leg's prompt. Repeatable, in order (default: the input's)"
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        typer.Option(
            "--overlap", min=0, max=64, help="Frames cross-faded between legs (default 4)"
        ),
    ] = None,
    file: _FileOpt = None,
    wait: _WaitOpt = False,
    dest: _OutOpt = None,
    job_id: _IdOpt = None,
    webhook: _WebhookOpt = None,
) -> None:
    """Create a travel (a long video through images); print it as JSON."""
    images = image or []
    if len(images) < 2:
        _fail("a travel needs at least 2 images: --image PATH_OR_URL, once per image")
    data = _json_object(input, "the input")
    files = [_file_option(option) for option in file or []]
    with _client(ctx) as client:
        _add_files(client, data, files)
        # a local file is uploaded; anything else (URL, data URI, upload id) goes as is
        refs = [_local_or_ref(ref) for ref in images]
        job = client.travel(
            data, refs, prompts=prompt, overlap=overlap, job_id=job_id, webhook=webhook
        )
        job = _finish(client, job, wait, dest)
    _print_job(job)


@app.command()
def join(
    ctx: typer.Context,
    clips: Annotated[
        list[str],
        typer.Argument(
            help="The clips, in order (2 or more): local files (uploaded), https URLs, data "
            "URIs or upload ids"
        ),
    ],
    input: Annotated[
        str, typer.Option("--input", help="Fields every bridge shares: a JSON object")
    ] = "{}",
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            "-p",
            help="The bridges' prompt; repeated, one per bridge, in order",
        ),
    ] = None,
    bridge_frames: Annotated[
        int | None,
        typer.Option("--bridge-frames", min=1, help="New frames between two clips (default 15)"),
    ] = None,
    wait: _WaitOpt = False,
    dest: _OutOpt = None,
    job_id: _IdOpt = None,
    webhook: _WebhookOpt = None,
) -> None:
    """Join clips with new frames between each two (first-last-frame services); print the
    join as JSON."""
    if len(clips) < 2:
        _fail("a join needs at least 2 clips")
    prompts = prompt or []
    with _client(ctx) as client:
        job = client.join(
            [_local_or_ref(clip) for clip in clips],
            input=_json_object(input, "the input"),
            bridge_frames=bridge_frames,
            prompt=prompts[0] if len(prompts) == 1 else None,
            prompts=prompts if len(prompts) > 1 else None,
            job_id=job_id,
            webhook=webhook,
        )
        job = _finish(client, job, wait, dest)
    _print_job(job)


@app.command()
def redo(
    ctx: typer.Context,
    video: Annotated[
        str,
        typer.Argument(help="The video: a local file (uploaded), an https URL or an upload id"),
    ],
    start: Annotated[int, typer.Option("--start", min=1, help="First frame made again (from 0)")],
    end: Annotated[int, typer.Option("--end", min=1, help="Last frame made again (included)")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="What the stretch shows")
    ] = None,
    input: Annotated[
        str, typer.Option("--input", help="The service's other fields: a JSON object")
    ] = "{}",
    wait: _WaitOpt = False,
    dest: _OutOpt = None,
    job_id: _IdOpt = None,
    webhook: _WebhookOpt = None,
) -> None:
    """Make a stretch of a video again (first-last-frame services); print the redo as
    JSON."""
    with _client(ctx) as client:
        job = client.redo(
            _local_or_ref(video),
            start,
            end,
            prompt=prompt,
            input=_json_object(input, "the input"),
            job_id=job_id,
            webhook=webhook,
        )
        job = _finish(client, job, wait, dest)
    _print_job(job)


def _local_or_ref(value: str) -> str | Path:
    """A local file (to upload), or a reference sent as it is (URL, data URI, upload id)."""
    return Path(value) if Path(value).is_file() else value


@app.command()
def wait(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The job's id")]) -> None:
    """Follow a job with a progress bar until it is done; print it as JSON."""
    with _client(ctx) as client:
        job = _follow(client, job_id)
    _print_job(job)


@app.command()
def get(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The job's id")]) -> None:
    """Print a job as JSON."""
    with _client(ctx) as client:
        job = client.get(job_id)
    out.print_json(data=job.raw)


@app.command()
def logs(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The job's id")]) -> None:
    """Print a job's own log (the service's, the worker's and ComfyUI's lines while it ran),
    one line each; says on stderr when the job still runs."""
    with _client(ctx) as client:
        log = client.logs(job_id)
    for line in log["lines"]:
        out.print(line, markup=False, highlight=False)
    if not log["complete"]:
        err.print(f"(job {job_id} is {log['status']}: its log is not complete yet)")


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option("--status", help="Only jobs in this status")] = (
        None
    ),
    limit: Annotated[int, typer.Option("--limit", help="At most this many (1 to 200)")] = 50,
    cursor: Annotated[
        int | None, typer.Option("--cursor", help="The next page (printed below a page)")
    ] = None,
) -> None:
    """List jobs, newest first, as a table."""
    with _client(ctx) as client:
        page = client.list(status=status, limit=limit, cursor=cursor)
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("queued (UTC)", no_wrap=True)
    table.add_column("error", overflow="fold", min_width=5)
    for job in page.jobs:
        queued = str(job.raw.get("timings", {}).get("queued_at", ""))[5:19].replace("T", " ")
        error = (job.error or {}).get("code", "")
        table.add_row(job.id, job.status, f"{job.progress:.0%}", queued, str(error))
    out.print(table)
    if page.next_cursor is not None:
        out.print(f"more: --cursor {page.next_cursor}", highlight=False)


@app.command()
def cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The job's id")]) -> None:
    """Cancel a job (a running one stops at its next step)."""
    with _client(ctx) as client:
        job = client.cancel(job_id)
    requested = " (cancel requested)" if job.raw.get("cancel_requested") and not job.done else ""
    out.print(f"{job.id}: {job.status}{requested}", highlight=False, markup=False)


@app.command()
def retry(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The job's id")]) -> None:
    """Run a failed or canceled job again."""
    with _client(ctx) as client:
        job = client.retry(job_id)
    out.print(f"{job.id}: {job.status}", highlight=False, markup=False)


@app.command()
def download(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id")],
    dest: Annotated[Path, typer.Option("--out", "-o", help="Folder to write to")] = Path("."),
) -> None:
    """Download a job's outputs; print the files written."""
    with _client(ctx) as client:
        job = client.get(job_id)
        if not job.outputs:
            _fail(f"job {job.id} is {job.status} and has no outputs")
        paths = client.download(job, dest)
    for path in paths:
        out.print(str(path), highlight=False, markup=False)


@contextmanager
def _client(ctx: typer.Context) -> Iterator[Client]:
    """A client from the global options; API and network errors end the command."""
    options: _Options = ctx.obj
    try:
        client = Client(options.url, options.key)
    except ValueError as exc:
        _fail(f"{exc} (or give --url)")
    try:
        with client:
            yield client
    except ServiceError as exc:
        status = f" (HTTP {exc.status_code})" if exc.status_code else ""
        _fail(f"{exc.code}{status}: {exc.message}")
    except httpx.TransportError as exc:
        _fail(f"cannot reach {client.base_url}: {str(exc) or type(exc).__name__}")
    except OSError as exc:
        _fail(str(exc))


def _follow(client: Client, job_id: str) -> Job:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(job_id, total=1.0)

        def show(job: Job) -> None:
            bar.update(task, completed=job.progress, description=f"{job.id} {job.status}")

        return client.wait(job_id, on_progress=show)


def _finish(client: Client, job: Job, wait: bool, dest: Path | None) -> Job:
    """`--wait`: the job once done; `--out`: that, and its outputs downloaded (the files
    written go to stderr, the job to stdout)."""
    if not (wait or dest is not None):
        return job
    job = _follow(client, job.id)
    if dest is not None and job.status == "succeeded":
        for path in client.download(job, dest):
            err.print(f"wrote {path}", highlight=False, markup=False)
    return job


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        _fail(f"{what} is not JSON: {exc}")
    if not isinstance(data, dict):
        _fail(f"{what} must be a JSON object")
    return data


def _add_files(client: Client, data: dict[str, Any], files: list[tuple[str, Path]]) -> None:
    """Uploads each `--file KEY=PATH` and puts its id in `data` under KEY."""
    for key, path in files:
        upload_id = client.upload(path)
        if key.endswith("[]"):
            values = data.setdefault(key[:-2], [])
            if not isinstance(values, list):
                _fail(f"--file {key}=...: input {key[:-2]!r} is not a list")
            values.append(upload_id)
        else:
            data[key] = upload_id


def _print_job(job: Job) -> None:
    """The job as JSON; a failed or canceled job then ends the command with exit 1."""
    out.print_json(data=job.raw)
    if job.status == "failed":
        error: dict[str, Any] = job.error or {}
        _fail(f"job {job.id} failed: {error.get('code')}: {error.get('message')}")
    if job.status == "canceled":
        _fail(f"job {job.id} was canceled")


def _file_option(option: str) -> tuple[str, Path]:
    key, sep, path = option.partition("=")
    if not sep or not key or key == "[]" or not path:
        _fail(f"--file wants KEY=PATH, not {option!r}")
    if not Path(path).is_file():
        _fail(f"--file {key}: no such file: {path}")
    return key, Path(path)


def _fail(message: str) -> NoReturn:
    err.print(f"error: {message}", highlight=False, markup=False)
    raise typer.Exit(1)
