"""The LoRA cache against a real loopback HTTP server that also answers like the Hub."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr
from safetensors.numpy import save
from structlog.testing import capture_logs

from model_service.errors import LoraInvalid, LoraUnavailable
from model_service.fetch import SafeHttpClient
from model_service.loras import LoraCache, LoraSource, list_cached, parse_lora_source
from model_service_testing.hub_standin import Server, serve

# huggingface_hub in this process calls the Hub look-alike
pytestmark = pytest.mark.usefixtures("hub_reachable")

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
FIELD = "loras[0].source"
CIVITAI_TOKEN = "civitai-key-5e1f0c-do-not-log"


def lora(seed: int = 0, *, width: int = 4096, names: tuple[str, ...] | None = None) -> bytes:
    """A rank-4 Wan-style LoRA of about 16 * width bytes."""
    prefix = "diffusion_model.blocks.0.self_attn.q"
    names = names or (f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight")
    rng = np.random.default_rng(seed)
    shapes = [(4, width), (width, 4)]
    tensors = {
        n: rng.standard_normal(shapes[i % 2]).astype(np.float16) for i, n in enumerate(names)
    }
    return save(tensors)


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as running:
        yield running


@asynccontextmanager
async def open_cache(
    root: Path, *, http: SafeHttpClient | None = None, **kwargs: Any
) -> AsyncIterator[LoraCache]:
    client = http or SafeHttpClient(allow_networks=LOOPBACK, max_bytes=2**30, timeout_s=20)
    try:
        kwargs.setdefault("max_bytes", 2**30)
        yield LoraCache(root, http=client, **kwargs)
    finally:
        await client.aclose()


def src(value: str) -> LoraSource:
    return parse_lora_source(value, field=FIELD)


def cached(root: Path) -> list[str]:
    """Names of the finished files in the cache folder (`<key>_<name>` → `<name>`)."""
    return sorted(p.name.split("_", 1)[1] for p in root.glob("*.safetensors"))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_source(server: Server, path: str, data: bytes | None = None) -> LoraSource:
    """A URL source on the loopback server (plain http, which `parse_lora_source` refuses)."""
    url = server.add(path, data) if data is not None else server.url + path
    return replace(src(url.replace("http://", "https://", 1)), url=url)


# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "repo_id", "path", "revision", "filename"),
    [
        ("hf://org/repo/lora.safetensors", "org/repo", "lora.safetensors", "main", None),
        (
            "hf://org/repo/sub/dir/My Lora (v2).safetensors@v1.0",
            "org/repo",
            "sub/dir/My Lora (v2).safetensors",
            "v1.0",
            "My_Lora_v2.safetensors",
        ),
        (f"hf://org/repo@{'b' * 40}/x.safetensors", "org/repo", "x.safetensors", "b" * 40, None),
        ("hf://org/repo/x.safetensors@refs/pr/1", "org/repo", "x.safetensors", "refs/pr/1", None),
    ],
)
def test_parse_accepts_hub_sources(
    value: str, repo_id: str, path: str, revision: str, filename: str | None
) -> None:
    source = src(value)
    assert (source.repo_id, source.path, source.revision, source.url) == (
        repo_id,
        path,
        revision,
        None,
    )
    assert source.filename == (filename or path.rsplit("/", 1)[-1])
    assert len(source.key) == 16
    assert int(source.key, 16) >= 0
    assert source.describe() == f"hf://{repo_id}/{path}@{revision}"


def test_parse_accepts_urls_and_keys_are_stable() -> None:
    source = src("https://Example.COM:443/a/b%20c.safetensors?sig=secret#frag")
    assert source.url == "https://example.com/a/b%20c.safetensors?sig=secret"
    assert source.filename == "b_c.safetensors"
    assert source.describe() == "https://example.com/a/b%20c.safetensors?…"  # no signature
    assert source.key == src("https://example.com/a/b%20c.safetensors?sig=secret").key
    assert source.key != src("https://example.com/a/b%20c.safetensors?sig=other").key
    assert src("hf://o/r/x.safetensors").key == src("hf://o/r/x.safetensors@main").key
    assert src("hf://o/r/x.safetensors").key != src("hf://o/r/x.safetensors@dev").key


@pytest.mark.parametrize(
    "value",
    [
        "",
        "lora.safetensors",
        "ftp://example.com/x.safetensors",
        "https://example.com/x.bin",
        "https://example.com/",
        "https:///x.safetensors",
        "https://user:pw@example.com/x.safetensors",
        "https://example.com/a/../x.safetensors",
        "https://example.com/a/%2e%2e/x.safetensors",
        "hf://org//x.safetensors",
        "hf://org/x.safetensors",
        "hf:///repo/x.safetensors",
        "hf://org/repo/../x.safetensors",
        "hf://org/repo/./x.safetensors",
        "hf://org/repo/x.pt",
        "hf://org/repo/x.safetensors@bad..rev",
        "hf://org/repo/x.safetensors@",
        "hf://org/re po/x.safetensors",
        "hf://org/repo/" + "a" * 3000 + ".safetensors",
    ],
)
def test_parse_refuses(value: str) -> None:
    with pytest.raises(LoraInvalid) as caught:
        src(value)
    assert caught.value.message.startswith(f"{FIELD}: ")
    assert caught.value.details == {"field": FIELD}
    assert caught.value.status_code == 422


def test_parse_accepts_civitai_download_urls() -> None:
    source = src("https://civitai.com/api/download/models/123456?type=Model&format=SafeTensor")
    assert (
        source.url == "https://civitai.com/api/download/models/123456?type=Model&format=SafeTensor"
    )
    assert source.filename == "civitai_123456.safetensors"
    assert source.describe() == "https://civitai.com/api/download/models/123456?…"
    assert src("https://civitai.com/api/download/models/7").filename == "civitai_7.safetensors"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://civitai.com/models/123/some-lora", "not a CivitAI download URL"),
        ("https://civitai.com/api/download/models/abc", "not a CivitAI download URL"),
        (f"https://civitai.com/api/download/models/1?token={CIVITAI_TOKEN}", "remove the token"),
        (f"https://civitai.com/api/download/models/1?TOKEN={CIVITAI_TOKEN}", "remove the token"),
    ],
)
def test_parse_refuses_civitai_pages_and_tokens_in_urls(value: str, expected: str) -> None:
    with pytest.raises(LoraInvalid, match=expected) as caught:
        src(value)
    assert CIVITAI_TOKEN not in caught.value.message


# --- downloading and caching ---------------------------------------------------------------


def test_downloads_once_then_serves_from_the_cache(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "loras" / "cache"
    data = lora(1)
    source = http_source(server, "/f/wan.safetensors", data)

    async def main() -> None:
        async with open_cache(root) as cache:
            with await cache.acquire(source, field=FIELD) as handle:
                assert handle.path == root.resolve() / f"{source.key}_wan.safetensors"
                assert handle.name == f"cache/{source.key}_wan.safetensors"
                assert handle.path.read_bytes() == data
                assert cache.stats() == {
                    "files": 1,
                    "bytes": len(data),
                    "max_bytes": 2**30,
                    "in_use": 1,
                }
            assert cache.stats()["in_use"] == 0
            handle.release()  # idempotent
            again = await cache.acquire(source, field=FIELD)
            again.release()
            assert again.path == handle.path

    asyncio.run(main())
    assert len(server.gets_of("/f/wan.safetensors")) == 1
    assert sorted(p.name for p in root.iterdir()) == [".meta", f"{source.key}_wan.safetensors"]
    (listed,) = list_cached(root)
    assert listed.name == f"cache/{source.key}_wan.safetensors"
    assert listed.source == source.describe()
    assert (listed.size_bytes, listed.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_concurrent_acquires_share_one_download(server: Server, tmp_path: Path) -> None:
    data = lora(2, width=32768)  # ~0.5 MB: 8 chunks of 64 KiB, 20 ms each
    server.knobs.chunk_delay_s = 0.02
    source = http_source(server, "/f/slow.safetensors", data)

    async def main() -> None:
        async with open_cache(tmp_path / "cache") as cache:
            first = asyncio.create_task(cache.acquire(source, field=FIELD))
            await asyncio.sleep(0.05)
            first.cancel()  # a waiter that gives up does not stop the download for others
            handles = await asyncio.gather(
                *(cache.acquire(source, field=f"loras[{i}].source") for i in range(5))
            )
            assert {h.path for h in handles} == {handles[0].path}
            assert handles[0].path.read_bytes() == data
            assert cache.stats()["in_use"] == 1
            for h in handles:
                h.release()
            assert cache.stats()["in_use"] == 0
            with pytest.raises(asyncio.CancelledError):
                await first

    asyncio.run(main())
    assert len(server.gets_of("/f/slow.safetensors")) == 1


def test_hub_source_through_hf_endpoint(server: Server, tmp_path: Path) -> None:
    data = lora(3)
    server.add("/hub/org/repo/loras/wan_high.safetensors", data)
    source = src("hf://org/repo/loras/wan_high.safetensors")
    root = tmp_path / "cache"

    async def main() -> None:
        async with open_cache(root, hf_endpoint=server.url, hf_token="hf_test") as cache:
            async with cache.use([source]) as (handle,):
                assert handle.path.read_bytes() == data
                assert handle.name == f"cache/{source.key}_wan_high.safetensors"
            again = await cache.acquire(source, field=FIELD)  # from the cache
            again.release()

    asyncio.run(main())
    assert len(server.gets_of("/hub/org/repo/loras/wan_high.safetensors")) == 1
    assert server.knobs.auth[-1] == "Bearer hf_test"
    assert cached(root) == ["wan_high.safetensors"]
    assert not list((root / ".staging").iterdir())


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, "'missing.safetensors' is not in org/repo at revision 'main'"),
        ((401, {"X-Error-Code": "RepoNotFound"}), "org/repo was not found"),
        ((403, {"X-Error-Code": "GatedRepo"}), "org/repo is gated"),
        ((404, {"X-Error-Code": "RevisionNotFound"}), "revision 'main' does not exist"),
    ],
)
def test_hub_errors_say_what_is_wrong(
    server: Server, tmp_path: Path, status: tuple[int, dict[str, str]] | None, expected: str
) -> None:
    if status is not None:
        server.knobs.status["/hub/org/repo/missing.safetensors"] = status
    source = src("hf://org/repo/missing.safetensors")

    async def main() -> None:
        async with open_cache(tmp_path / "cache", hf_endpoint=server.url) as cache:
            with pytest.raises(LoraUnavailable, match=expected) as caught:
                await cache.acquire(source, field=FIELD)
            assert caught.value.message.startswith(
                f"{FIELD}: cannot download LoRA hf://org/repo/missing.safetensors@main: "
            )
            assert caught.value.details["field"] == FIELD
            assert cache.stats()["in_use"] == 0

    asyncio.run(main())


def test_unreachable_hub_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        endpoint = f"http://127.0.0.1:{closed_port()}"
        async with open_cache(tmp_path / "cache", hf_endpoint=endpoint) as cache:
            with pytest.raises(LoraUnavailable, match="Hugging Face Hub could not be reached"):
                await cache.acquire(src("hf://org/repo/x.safetensors"), field=FIELD)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"<html><body>Sign in to download</body></html>", "is not a safetensors file"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00{x" + b"\x00" * 64, "is not a safetensors file"),
        (lora(4, names=("model.diffusion_model.blocks.0.weight",)), "holds no LoRA tensors"),
        (lora(5)[:-100], "names data beyond"),
        (lora(6) + b"\x00" * 100, "does not match its header"),
    ],
)
def test_files_that_are_not_loras_are_refused(
    server: Server, tmp_path: Path, data: bytes, expected: str
) -> None:
    source = http_source(server, "/f/bad.safetensors", data)
    root = tmp_path / "cache"

    async def main() -> None:
        async with open_cache(root) as cache:
            with pytest.raises(LoraInvalid, match=expected) as caught:
                await cache.acquire(source, field=FIELD)
            assert caught.value.message.startswith(f"{FIELD}: LoRA {source.describe()} ")
            assert caught.value.details == {"field": FIELD, "source": source.describe()}

    asyncio.run(main())
    assert list(root.iterdir()) == []  # no .part left


@pytest.mark.parametrize("limit", ["cache", "client"])
def test_files_over_the_size_limit_are_refused(server: Server, tmp_path: Path, limit: str) -> None:
    data = lora(7)
    source = http_source(server, "/f/big.safetensors", data)

    async def main() -> None:
        small = len(data) - 1
        http = SafeHttpClient(
            allow_networks=LOOPBACK, max_bytes=small if limit == "client" else 2**30, timeout_s=9
        )
        kwargs = {"max_file_bytes": small} if limit == "cache" else {}
        async with open_cache(tmp_path / "cache", http=http, **kwargs) as cache:
            with pytest.raises(LoraInvalid, match=f"over the limit of {small} bytes"):
                await cache.acquire(source, field=FIELD)

    asyncio.run(main())


def test_hub_file_over_the_size_limit_is_not_downloaded(server: Server, tmp_path: Path) -> None:
    data = lora(8)
    server.add("/hub/org/repo/big.safetensors", data)

    async def main() -> None:
        async with open_cache(
            tmp_path / "cache", hf_endpoint=server.url, max_file_bytes=len(data) - 1
        ) as cache:
            with pytest.raises(LoraInvalid, match=f"it is {len(data)} bytes, over the limit"):
                await cache.acquire(src("hf://org/repo/big.safetensors"), field=FIELD)

    asyncio.run(main())
    assert server.gets_of("/hub/org/repo/big.safetensors") == []


def test_http_errors_are_unavailable_with_the_status(server: Server, tmp_path: Path) -> None:
    missing = http_source(server, "/f/missing.safetensors")
    broken = http_source(server, "/f/broken.safetensors", lora(9))
    server.knobs.status["/f/broken.safetensors"] = (503, {})
    down = src(f"https://127.0.0.1:{closed_port()}/x.safetensors")

    async def main() -> None:
        async with open_cache(tmp_path / "cache", retries=0) as cache:
            with pytest.raises(LoraUnavailable) as caught:
                await cache.acquire(missing, field=FIELD)
            assert caught.value.message == (
                f"{FIELD}: cannot download LoRA {missing.describe()}: the server answered "
                "HTTP 404 (not found); check the URL in the LoRA source"
            )
            assert caught.value.details["status"] == 404
            with pytest.raises(LoraUnavailable, match="answered HTTP 503; gave up") as caught:
                await cache.acquire(broken, field=FIELD)
            assert caught.value.details["status"] == 503
            with pytest.raises(LoraUnavailable, match="could not connect"):
                await cache.acquire(down, field=FIELD)
            assert cache.stats() == {"files": 0, "bytes": 0, "max_bytes": 2**30, "in_use": 0}

    asyncio.run(main())


def test_default_client_refuses_private_addresses(server: Server, tmp_path: Path) -> None:
    source = src(server.add("/f/a.safetensors", lora(10)).replace("http://", "https://"))

    async def main() -> None:
        http = SafeHttpClient(max_bytes=2**30, timeout_s=5)  # no allow_networks
        async with open_cache(tmp_path / "cache", http=http) as cache:
            with pytest.raises(LoraUnavailable, match="127.0.0.1, a non-public address"):
                await cache.acquire(source, field=FIELD)

    asyncio.run(main())
    assert server.knobs.gets == []


def test_use_releases_everything_when_one_fails(server: Server, tmp_path: Path) -> None:
    good = http_source(server, "/f/good.safetensors", lora(11))
    bad = http_source(server, "/f/nowhere.safetensors")

    async def main() -> None:
        async with open_cache(tmp_path / "cache") as cache:
            with pytest.raises(LoraUnavailable) as caught:
                async with cache.use([good, bad], field="input.loras"):
                    pytest.fail("must not be reached")
            assert caught.value.details["field"] == "input.loras[1].source"
            assert cache.stats()["in_use"] == 0
            async with cache.use([good, good]) as handles:
                assert [h.path for h in handles] == [handles[0].path] * 2
                assert cache.stats()["in_use"] == 1
            assert cache.stats()["in_use"] == 0

    asyncio.run(main())


# --- eviction -------------------------------------------------------------------------------


def test_evicts_the_least_recently_used(server: Server, tmp_path: Path) -> None:
    data = {n: lora(20 + i) for i, n in enumerate("abc")}
    size = len(data["a"])
    sources = {n: http_source(server, f"/f/{n}.safetensors", d) for n, d in data.items()}
    root = tmp_path / "cache"

    async def main() -> None:
        async with open_cache(root, max_bytes=size * 5 // 2) as cache:
            paths = {}
            for name in "ab":
                with await cache.acquire(sources[name], field=FIELD) as handle:
                    paths[name] = handle.path
            age(paths["a"], 100)
            age(paths["b"], 50)
            (await cache.acquire(sources["a"], field=FIELD)).release()  # a: used just now
            (await cache.acquire(sources["c"], field=FIELD)).release()
            assert cached(root) == ["a.safetensors", "c.safetensors"]
            assert cache.stats()["bytes"] <= cache.max_bytes

    asyncio.run(main())


def test_files_in_use_are_not_evicted(server: Server, tmp_path: Path) -> None:
    data = {n: lora(30 + i) for i, n in enumerate("abc")}
    a, b, c = data.values()
    sources = {n: http_source(server, f"/f/{n}.safetensors", d) for n, d in data.items()}
    root = tmp_path / "cache"

    async def main() -> None:
        async with open_cache(root, max_bytes=len(a) // 2) as cache:  # under one file
            held_a = await cache.acquire(sources["a"], field=FIELD)
            held_b = await cache.acquire(sources["b"], field=FIELD)
            assert cached(root) == ["a.safetensors", "b.safetensors"]  # both in use
            assert cache.stats()["bytes"] == len(a) + len(b) > cache.max_bytes
            held_a.release()
            held_b.release()
            assert cached(root) == ["a.safetensors", "b.safetensors"]  # nothing new yet
            with await cache.acquire(sources["c"], field=FIELD) as held_c:
                assert cached(root) == ["c.safetensors"]  # kept while in use, though too big
                assert held_c.path.read_bytes() == c

    asyncio.run(main())


def test_leftovers_are_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / ".staging" / "x.part").mkdir(parents=True)
    (root / ".staging" / "x.part" / "x.safetensors").write_bytes(b"partial")
    (root / "0123456789abcdef_x.safetensors.1a2b3c4d.part").write_bytes(b"partial")
    (root / "notes.txt").write_text("not ours")
    done = root / "0123456789abcdef_y.safetensors"
    done.write_bytes(b"y" * 10)

    async def main() -> None:
        async with open_cache(root) as cache:
            assert cache.stats()["files"] == 1

    asyncio.run(main())
    assert sorted(p.name for p in root.iterdir()) == [done.name, "notes.txt"]


def test_lru_order_survives_a_restart(server: Server, tmp_path: Path) -> None:
    data = {n: lora(40 + i) for i, n in enumerate("abcd")}
    size = len(data["a"])
    sources = {n: http_source(server, f"/f/{n}.safetensors", d) for n, d in data.items()}
    root = tmp_path / "cache"

    async def main() -> None:
        async with open_cache(root) as first:
            for name in "abc":
                with await first.acquire(sources[name], field=FIELD) as handle:
                    age(handle.path, {"a": 300, "b": 200, "c": 100}[name])
            (await first.acquire(sources["a"], field=FIELD)).release()  # a: newest now
        # A new process with a smaller cap evicts by the mtimes on disk: b, then c.
        async with open_cache(root, max_bytes=size * 5 // 2) as second:
            assert cached(root) == ["a.safetensors", "c.safetensors"]
            (await second.acquire(sources["d"], field=FIELD)).release()
            assert cached(root) == ["a.safetensors", "d.safetensors"]

    asyncio.run(main())
    assert len(server.gets_of("/f/a.safetensors")) == 1


# --- CivitAI, resuming, the listing ------------------------------------------------------------


@pytest.fixture
def storage() -> Iterator[Server]:
    """A second origin: the signed storage a CivitAI download redirects to."""
    with serve() as running:
        yield running


def civitai_source(server: Server, model_id: int) -> LoraSource:
    """A CivitAI download URL whose requests go to the loopback stand-in."""
    path = f"/api/download/models/{model_id}"
    return replace(src(f"https://civitai.com{path}?type=Model"), url=server.url + path)


def test_civitai_download_sends_the_token_and_follows_the_redirect(
    server: Server, storage: Server, tmp_path: Path
) -> None:
    data = lora(50)
    signed = storage.add("/b2/file.safetensors", data) + "?X-Amz-Signature=abc"
    server.knobs.redirect["/api/download/models/42"] = signed
    source = civitai_source(server, 42)
    root = tmp_path / "cache"

    async def main() -> None:
        async with open_cache(root, civitai_token=SecretStr(CIVITAI_TOKEN)) as cache:
            with await cache.acquire(source, field=FIELD) as handle:
                assert handle.path.read_bytes() == data
                assert handle.name == f"cache/{source.key}_civitai_42.safetensors"

    with capture_logs() as logs:
        asyncio.run(main())
    assert server.auth_of("/api/download/models/42") == [f"Bearer {CIVITAI_TOKEN}"]
    assert storage.auth_of("/b2/file.safetensors") == [None]  # not to the storage
    (listed,) = list_cached(root)
    assert listed.source == "https://civitai.com/api/download/models/42?…"
    assert CIVITAI_TOKEN not in repr(logs)
    assert CIVITAI_TOKEN not in (root / ".meta" / f"{source.stored_name}.json").read_text()


@pytest.mark.parametrize("token", [None, CIVITAI_TOKEN])
def test_civitai_refusal_says_to_set_the_token_and_never_shows_it(
    server: Server, tmp_path: Path, token: str | None
) -> None:
    server.knobs.status["/api/download/models/43"] = (401, {})
    source = civitai_source(server, 43)

    async def main() -> None:
        async with open_cache(tmp_path / "cache", civitai_token=token) as cache:
            with pytest.raises(LoraUnavailable, match="set CIVITAI_TOKEN") as caught:
                await cache.acquire(source, field=FIELD)
            error = caught.value.to_dict()
            assert error["status"] == 401
            assert CIVITAI_TOKEN not in repr(error)

    with capture_logs() as logs:
        asyncio.run(main())
    assert CIVITAI_TOKEN not in repr(logs)
    expected = None if token is None else f"Bearer {token}"
    assert server.auth_of("/api/download/models/43") == [expected]


def test_the_token_goes_to_civitai_only(server: Server, tmp_path: Path) -> None:
    data = lora(51)
    source = http_source(server, "/f/plain.safetensors", data)

    async def main() -> None:
        async with open_cache(tmp_path / "cache", civitai_token=CIVITAI_TOKEN) as cache:
            (await cache.acquire(source, field=FIELD)).release()

    asyncio.run(main())
    assert server.auth_of("/f/plain.safetensors") == [None]


def test_a_cut_download_resumes_with_range(server: Server, tmp_path: Path) -> None:
    data = lora(52, width=32768)
    source = http_source(server, "/f/cut.safetensors", data)
    server.knobs.cut_after["/f/cut.safetensors"] = 196_608  # 3 chunks of 64 KiB

    async def main() -> None:
        async with open_cache(tmp_path / "cache") as cache:
            with await cache.acquire(source, field=FIELD) as handle:
                assert handle.path.read_bytes() == data

    asyncio.run(main())
    assert server.gets_of("/f/cut.safetensors") == [None, "bytes=196608-"]
    assert server.knobs.served == len(data)


def test_get_v1_loras_lists_the_cache(server: Server, tmp_path: Path, echo_service: Any) -> None:
    models = tmp_path / "models"
    data = lora(53)
    source = http_source(server, "/f/listed.safetensors", data)

    async def main() -> None:
        async with open_cache(models / "loras" / "cache") as cache:
            (await cache.acquire(source, field=FIELD)).release()

    asyncio.run(main())
    service = echo_service(env={"MODELS_DIR": str(models), "LORA_CACHE_GB": "2"})
    with service.client() as client:
        body = client.get("/v1/loras").json()
        assert "/v1/loras" in client.get("/openapi.json").json()["paths"]
    (listed,) = body["loras"]
    assert listed["name"] == f"cache/{source.stored_name}"
    assert listed["source"] == source.describe()
    assert listed["size_bytes"] == len(data) == body["total_bytes"]
    assert listed["sha256"] == hashlib.sha256(data).hexdigest()
    assert listed["last_used"].endswith("+00:00")
    assert body["max_bytes"] == 2_000_000_000
