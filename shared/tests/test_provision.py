"""Model provisioning against a real HTTP server on loopback (plain URLs and a fake Hub)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub.constants
import pytest
from prometheus_client import CollectorRegistry

from model_service.provision import (
    FileLock,
    HubSource,
    Manifest,
    ModelFile,
    ProvisionError,
    ProvisionMetrics,
    UrlSource,
    provision,
)
from model_service_testing.hub_standin import COMMIT, Server, blob, serve, sha

# huggingface_hub in this process calls the Hub look-alike
pytestmark = pytest.mark.usefixtures("hub_reachable")

SHARED_SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as running:
        yield running


def url_file(
    url: str,
    data: bytes,
    *,
    name: str = "a.safetensors",
    folder: str = "vae",
    with_sha: bool = True,
) -> ModelFile:
    return ModelFile(name, folder, UrlSource(url), len(data), sha(data) if with_sha else None)


def staging_leftovers(models: Path) -> list[str]:
    staging = models / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


CLI_ENV = {**os.environ, "LOG_FORMAT": "json", "PYTHONPATH": str(SHARED_SRC)}


def download_command(manifest: Path, models: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "model_service.cli",
        "download",
        "--manifest",
        str(manifest),
        "--models-dir",
        str(models),
        *extra,
    ]


FAST = {"poll_s": 0.05, "retry_delay_s": 0.01, "progress_every_s": 0.2}


# --- downloads ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_downloads_url_and_hub_files_and_verifies(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    a, b = blob(1), blob(2, 300_000)
    url = server.add("/files/a.safetensors", a)
    server.add("/hub/org/repo/split_files/vae/b.safetensors", b)
    manifest = Manifest(
        "svc",
        (
            url_file(url, a),
            ModelFile(
                "b.safetensors",
                "loras/wan",
                HubSource("org/repo", "split_files/vae/b.safetensors", COMMIT),
                len(b),
                sha(b),
            ),
        ),
    )
    seen: list[tuple[str, int, int]] = []
    metrics = ProvisionMetrics(CollectorRegistry())
    report = await provision(
        manifest,
        models,
        hf_endpoint=server.url,
        hf_token="hf_secret",
        on_progress=lambda f, done, total: seen.append((f.name, done, total)),
        metrics=metrics,
        **FAST,
    )
    assert (models / "vae" / "a.safetensors").read_bytes() == a
    assert (models / "loras" / "wan" / "b.safetensors").read_bytes() == b
    assert {r.outcome for r in report.results} == {"downloaded"}
    assert report.bytes_downloaded == len(a) + len(b)
    assert ("a.safetensors", len(a), len(a)) in seen
    assert ("b.safetensors", len(b), len(b)) in seen
    assert staging_leftovers(models) == []
    assert metrics.registry.get_sample_value(
        "model_download_bytes_total", {"file": "vae/a.safetensors"}
    ) == len(a)
    assert metrics.registry.get_sample_value(
        "model_download_bytes_total", {"file": "loras/wan/b.safetensors"}
    ) == len(b)
    assert metrics.registry.get_sample_value("model_download_remaining_bytes") == 0
    # The token goes to the Hub, never to a plain URL on another host.
    assert server.knobs.auth[server.knobs.gets.index(("/files/a.safetensors", None))] is None
    assert "Bearer hf_secret" in server.knobs.auth

    again = await provision(manifest, models, hf_endpoint=server.url, **FAST)
    assert {r.outcome for r in again.results} == {"present"}
    assert len(server.knobs.gets) == 2  # nothing downloaded twice


@pytest.mark.anyio
@pytest.mark.parametrize("hub", [False, True])
async def test_progress_is_reported_while_downloading(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: bool
) -> None:
    data = blob(22)
    server.knobs.chunk_delay_s = 0.03  # about 0.5 s
    # huggingface_hub reports progress every 10 MB read; make that 64 KiB here.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 65536)
    if hub:
        server.add("/hub/org/repo/c.safetensors", data)
        file = ModelFile("c.safetensors", "vae", HubSource("org/repo", "c.safetensors"), len(data))
    else:
        file = url_file(server.add("/c.safetensors", data), data)
    seen: list[int] = []
    await provision(
        Manifest("svc", (file,)),
        tmp_path / "models",
        hf_endpoint=server.url,
        on_progress=lambda _, done, total: seen.append(done),
        **{**FAST, "progress_every_s": 0.1},
    )
    assert seen[-1] == len(data)
    assert any(0 < done < len(data) for done in seen)
    assert seen == sorted(seen)


@pytest.mark.anyio
async def test_cut_connection_resumes_with_range(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    data = blob(3)
    url = server.add("/a.safetensors", data)
    server.knobs.cut_after["/a.safetensors"] = 300_000
    manifest = Manifest("svc", (url_file(url, data),))

    # No retries: the run fails and leaves the part file, which the next run continues.
    with pytest.raises(ProvisionError, match="the download continues where it stopped"):
        await provision(manifest, models, retries=0, **FAST)
    assert not (models / "vae" / "a.safetensors").exists()
    assert (models / ".staging" / "vae__a.safetensors.part").stat().st_size == 300_000

    report = await provision(manifest, models, **FAST)
    assert (models / "vae" / "a.safetensors").read_bytes() == data
    assert server.gets_of("/a.safetensors") == [None, "bytes=300000-"]
    assert server.knobs.served == len(data)  # every byte sent once
    assert report.results[0].bytes_downloaded == len(data) - 300_000
    assert staging_leftovers(models) == []


@pytest.mark.anyio
async def test_cut_connection_resumes_within_one_run(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    data = blob(4)
    url = server.add("/a.safetensors", data)
    server.knobs.cut_after["/a.safetensors"] = 458_752  # 7 chunks of 64 KiB
    await provision(Manifest("svc", (url_file(url, data),)), models, **FAST)
    assert (models / "vae" / "a.safetensors").read_bytes() == data
    assert server.gets_of("/a.safetensors") == [None, "bytes=458752-"]
    assert server.knobs.served == len(data)


@pytest.mark.anyio
async def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    data = blob(5)
    url = server.add("/a.safetensors", data)
    server.knobs.cut_after["/a.safetensors"] = 200_000
    server.knobs.ignore_range.add("/a.safetensors")
    await provision(Manifest("svc", (url_file(url, data),)), models, **FAST)
    assert (models / "vae" / "a.safetensors").read_bytes() == data
    assert server.gets_of("/a.safetensors") == [None, "bytes=200000-"]
    assert server.knobs.served == 200_000 + len(data)


@pytest.mark.anyio
async def test_hash_mismatch_leaves_nothing_under_the_final_name(
    server: Server, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    data = blob(6)
    url = server.add("/a.safetensors", data)
    server.knobs.wrong_bytes.add("/a.safetensors")
    with pytest.raises(ProvisionError) as info:
        await provision(Manifest("svc", (url_file(url, data),)), models, **FAST)
    assert info.value.code == "model_download_failed"
    assert "sha256 mismatch" in info.value.message
    assert "the download was deleted" in info.value.message
    assert not (models / "vae" / "a.safetensors").exists()
    assert staging_leftovers(models) == []  # part file deleted, lock released


@pytest.mark.anyio
async def test_not_safetensors_content_is_refused(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    page = b"<html>" + b"x" * 994
    url = server.add("/a.safetensors", page)
    with pytest.raises(ProvisionError, match="not a safetensors file"):
        await provision(Manifest("svc", (url_file(url, page, with_sha=False),)), models, **FAST)
    assert not (models / "vae" / "a.safetensors").exists()


@pytest.mark.anyio
async def test_wrong_size_in_manifest_is_reported(server: Server, tmp_path: Path) -> None:
    data = blob(7)
    url = server.add("/a.safetensors", data)
    file = ModelFile("a.safetensors", "vae", UrlSource(url), len(data) + 1)
    with pytest.raises(ProvisionError, match="manifest says"):
        await provision(Manifest("svc", (file,)), tmp_path / "models", **FAST)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "expected"), [(403, "set HF_TOKEN"), (404, "check the URL in the manifest")]
)
async def test_http_errors_say_what_to_do(
    server: Server, tmp_path: Path, status: int, expected: str
) -> None:
    data = blob(8)
    url = server.add("/a.safetensors", data)
    server.knobs.status["/a.safetensors"] = (status, {})
    with pytest.raises(ProvisionError, match=expected):
        await provision(Manifest("svc", (url_file(url, data),)), tmp_path / "models", **FAST)
    assert len(server.knobs.gets) == 1  # not retried


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (401, {"X-Error-Code": "RepoNotFound"}, "set HF_TOKEN"),
        (403, {"X-Error-Code": "GatedRepo"}, "accept its terms"),
        (404, {"X-Error-Code": "EntryNotFound"}, "fix the path in the manifest"),
    ],
)
async def test_hub_errors_say_what_to_do(
    server: Server, tmp_path: Path, status: int, headers: dict[str, str], expected: str
) -> None:
    data = blob(9)
    server.add("/hub/org/repo/b.safetensors", data)
    server.knobs.status["/hub/org/repo/b.safetensors"] = (status, headers)
    file = ModelFile("b.safetensors", "vae", HubSource("org/repo", "b.safetensors"), len(data))
    with pytest.raises(ProvisionError, match=expected):
        await provision(Manifest("svc", (file,)), tmp_path / "models", hf_endpoint=server.url)


@pytest.mark.anyio
async def test_one_failure_does_not_stop_the_others(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    good, bad = blob(10), blob(11)
    manifest = Manifest(
        "svc",
        (
            url_file(server.add("/good.safetensors", good), good, name="good.safetensors"),
            url_file(server.url + "/nowhere.safetensors", bad, name="bad.safetensors"),
        ),
    )
    with pytest.raises(ProvisionError, match="not found"):
        await provision(manifest, models, **FAST)
    assert (models / "vae" / "good.safetensors").read_bytes() == good


# --- several downloaders ----------------------------------------------------------------


@pytest.mark.anyio
async def test_two_tasks_download_the_file_once(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    data = blob(12)
    url = server.add("/a.safetensors", data)
    server.knobs.chunk_delay_s = 0.03  # about 0.5 s
    manifest = Manifest("svc", (url_file(url, data),))
    first, second = await asyncio.gather(
        provision(manifest, models, **FAST), provision(manifest, models, **FAST)
    )
    assert len(server.gets_of("/a.safetensors")) == 1
    outcomes = {first.results[0].outcome, second.results[0].outcome}
    assert outcomes == {"downloaded", "downloaded_elsewhere"}
    assert (models / "vae" / "a.safetensors").read_bytes() == data


def test_two_processes_download_the_file_once(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    data, other = blob(13), blob(14, 200_000)
    server.knobs.chunk_delay_s = 0.1  # about 1.6 s for the large file
    manifest = Manifest(
        "svc",
        (
            url_file(server.add("/a.safetensors", data), data),
            url_file(server.add("/o.safetensors", other), other, name="o.safetensors"),
        ),
    )
    path = tmp_path / "manifest.json"
    manifest.save(path)
    command = download_command(path, models, "--parallel", "2")
    procs = [
        subprocess.Popen(command, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        assert b"svc: 2 files in" in out
    assert len(server.gets_of("/a.safetensors")) == 1
    assert len(server.gets_of("/o.safetensors")) == 1
    logs = b"".join(err for _, err in outputs)
    assert b"waiting for another process to download the file" in logs  # they did overlap
    assert (models / "vae" / "a.safetensors").read_bytes() == data
    assert (models / "vae" / "o.safetensors").read_bytes() == other
    assert staging_leftovers(models) == []


def test_cli_failure_exits_non_zero_with_the_reason(server: Server, tmp_path: Path) -> None:
    data = blob(15)
    path = tmp_path / "manifest.json"
    Manifest("svc", (url_file(server.url + "/missing.safetensors", data),)).save(path)
    proc = subprocess.run(
        download_command(path, tmp_path / "models"), env=CLI_ENV, capture_output=True, timeout=60
    )
    assert proc.returncode == 1
    assert b"model download failed: vae/a.safetensors from" in proc.stderr
    assert b"check the URL in the manifest" in proc.stderr


@pytest.mark.anyio
async def test_stale_lock_is_taken_over(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    data = blob(16)
    url = server.add("/a.safetensors", data)
    lock = models / ".staging" / "vae__a.safetensors.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "dead-pod", "pid": 1, "token": "x"}))
    old = time.time() - 1000
    os.utime(lock, (old, old))
    report = await provision(Manifest("svc", (url_file(url, data),)), models, **FAST)
    assert report.results[0].outcome == "downloaded"
    assert (models / "vae" / "a.safetensors").read_bytes() == data
    assert not lock.exists()


@pytest.mark.anyio
async def test_lock_unchanged_for_too_long_is_stale_despite_a_fresh_mtime(
    server: Server, tmp_path: Path
) -> None:
    """Clock skew: the holder's mtime looks recent, but nobody touches it any more."""
    models = tmp_path / "models"
    data = blob(17)
    url = server.add("/a.safetensors", data)
    lock = models / ".staging" / "vae__a.safetensors.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "skewed-pod", "pid": 1, "token": "x"}))
    future = time.time() + 3600
    os.utime(lock, (future, future))
    started = time.monotonic()
    await provision(Manifest("svc", (url_file(url, data),)), models, stale_after_s=0.5, **FAST)
    assert 0.5 <= time.monotonic() - started < 5
    assert (models / "vae" / "a.safetensors").read_bytes() == data


@pytest.mark.anyio
async def test_heartbeat_keeps_a_slow_download_locked(server: Server, tmp_path: Path) -> None:
    """A download longer than `stale_after_s` is not taken over while its holder lives."""
    models = tmp_path / "models"
    data = blob(18)
    url = server.add("/a.safetensors", data)
    server.knobs.chunk_delay_s = 0.06  # about 1 s, twice stale_after_s
    manifest = Manifest("svc", (url_file(url, data),))
    timing = {"stale_after_s": 0.5, "heartbeat_s": 0.05, **FAST}
    first = asyncio.create_task(provision(manifest, models, **timing))
    await asyncio.sleep(0.1)
    second = await provision(manifest, models, **timing)
    await first
    assert second.results[0].outcome == "downloaded_elsewhere"
    assert len(server.gets_of("/a.safetensors")) == 1


@pytest.mark.anyio
async def test_a_downloader_that_loses_its_lock_stops_and_resumes_later(
    server: Server, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    data = blob(20)
    url = server.add("/a.safetensors", data)
    server.knobs.chunk_delay_s = 0.05  # about 0.8 s
    lock = models / ".staging" / "vae__a.safetensors.lock"
    manifest = Manifest("svc", (url_file(url, data),))
    task = asyncio.create_task(provision(manifest, models, heartbeat_s=0.05, **FAST))
    while not server.gets_of("/a.safetensors"):  # downloading (a busy machine starts late)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    lock.write_text(json.dumps({"host": "thief", "pid": 1, "token": "x"}))  # someone broke it
    await asyncio.sleep(0.3)
    assert not task.done()
    assert json.loads(lock.read_text())["host"] == "thief"  # the loser waits, no placing
    assert not (models / "vae" / "a.safetensors").exists()
    lock.unlink()  # the thief went away without finishing
    report = await task
    assert report.results[0].outcome == "downloaded"
    assert (models / "vae" / "a.safetensors").read_bytes() == data
    ranges = server.gets_of("/a.safetensors")
    assert len(ranges) == 2
    assert ranges[1] is not None  # continued the part file


@pytest.mark.anyio
async def test_a_complete_part_file_is_verified_and_placed(server: Server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    data = blob(21)
    url = server.add("/a.safetensors", data)
    (models / ".staging").mkdir(parents=True)
    (models / ".staging" / "vae__a.safetensors.part").write_bytes(data)
    await provision(Manifest("svc", (url_file(url, data),)), models, **FAST)
    assert (models / "vae" / "a.safetensors").read_bytes() == data
    assert server.knobs.gets == []


def test_only_one_waiter_breaks_a_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    path.write_text("{}")
    old = time.time() - 1000
    os.utime(path, (old, old))
    a, b = FileLock(path), FileLock(path)
    assert a.break_if_stale()
    assert a.try_acquire()
    assert not b.break_if_stale()  # a's fresh lock is not stale
    assert not b.try_acquire()
    assert a.owned()
    assert not b.owned()
    assert a.heartbeat()
    assert not b.heartbeat()
    b.release()  # not b's: stays
    assert path.exists()
    a.release()
    assert not path.exists()


# --- disk space and the manifest --------------------------------------------------------


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


@pytest.mark.anyio
async def test_disk_space_check_refuses(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob(19)
    url = server.add("/a.safetensors", data)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: _Usage(10**12, 10**12 - 500_000, 500_000))
    with pytest.raises(ProvisionError) as info:
        await provision(
            Manifest("svc", (url_file(url, data),)), tmp_path / "models", disk_margin_bytes=10**6
        )
    message = info.value.message
    assert "not enough disk space" in message
    assert "needs 2.0 MB, but only 500000 bytes is free. Free 1.5 MB" in message
    assert "bigger volume" in message
    assert info.value.details == {"needed_bytes": 2 * 10**6, "free_bytes": 500_000}
    assert server.knobs.gets == []


def test_missing_sees_absent_and_wrong_size_files(tmp_path: Path) -> None:
    files = tuple(
        ModelFile(f"{n}.safetensors", "vae", UrlSource(f"https://x.org/{n}"), 10)
        for n in ("ok", "short", "absent")
    )
    manifest = Manifest("svc", files)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "ok.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "vae" / "short.safetensors").write_bytes(b"x" * 9)
    assert [f.name for f in manifest.missing(tmp_path)] == [
        "short.safetensors",
        "absent.safetensors",
    ]
    assert manifest.total_bytes == 30


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "model.ckpt"},
        {"name": "model.bin"},
        {"name": "../escape.safetensors"},
        {"name": "sub/x.safetensors"},
        {"folder": "../etc"},
        {"folder": ".staging"},
        {"size_bytes": 0},
        {"sha256": "ABC"},
        {"hub": {"repo_id": "org/repo", "path": "pytorch_model.bin"}},
        {"hub": {"repo_id": "no-owner", "path": "x.safetensors"}},
        {"url": "ftp://example.com/x.safetensors"},
    ],
)
def test_manifest_refuses_bad_entries(tmp_path: Path, bad: dict[str, Any]) -> None:
    entry: dict[str, Any] = {
        "name": "x.safetensors",
        "folder": "vae",
        "url": "https://example.com/x.safetensors",
        "size_bytes": 5,
        "sha256": None,
    }
    if "hub" in bad:
        del entry["url"]
    if "url" in bad:
        del entry["url"]
    entry.update(bad)
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"service": "svc", "files": [entry]}))
    with pytest.raises(ValueError, match="invalid manifest"):
        Manifest.load(path)


def test_non_safetensors_refused_when_building() -> None:
    with pytest.raises(ValueError, match="only .safetensors"):
        ModelFile("x.pt", "loras", UrlSource("https://example.com/x.pt"), 1)
    with pytest.raises(ValueError, match="not a .safetensors file"):
        HubSource("org/repo", "x.pth")


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    manifest = Manifest(
        "wan",
        (
            ModelFile(
                "wan_2.1_vae.safetensors",
                "vae",
                HubSource(
                    "Comfy-Org/Wan_2.2_ComfyUI_Repackaged",
                    "split_files/vae/wan_2.1_vae.safetensors",
                ),
                253_815_318,
            ),
            ModelFile("l.safetensors", "loras", UrlSource("https://e.org/l"), 7, "0" * 64),
        ),
    )
    path = tmp_path / "wan.json"
    manifest.save(path)
    assert Manifest.load(path) == manifest
    with pytest.raises(ValueError, match="appears twice"):
        Manifest("wan", (manifest.files[0], manifest.files[0]))


def test_cli_download_sends_the_civitai_token_to_provision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model-service download` hands CIVITAI_TOKEN to the download (which sends it to
    civitai.com only, `Tokens.headers_for`), as the services' own start does."""
    import model_service.provision as provisioning
    from model_service import cli

    seen: dict[str, Any] = {}

    async def fake_provision(manifest: Manifest, models_dir: Path, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise provisioning.ProvisionError("stop here")

    path = tmp_path / "manifest.json"
    Manifest("svc", (url_file("https://civitai.com/api/download/models/1", blob(1)),)).save(path)
    monkeypatch.setattr(provisioning, "provision", fake_provision)
    monkeypatch.setenv("CIVITAI_TOKEN", "civitai-secret")
    with pytest.raises(SystemExit, match="stop here"):
        cli.run_download(path, tmp_path / "models", 1)
    assert seen["civitai_token"] == "civitai-secret"
