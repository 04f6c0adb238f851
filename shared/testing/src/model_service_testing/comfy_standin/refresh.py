"""Regenerate the stand-in's node schema (`snapshot.OBJECT_INFO`) from a real ComfyUI of
the pinned version: `python -m model_service_testing.comfy_standin.refresh --comfyui-dir
DIR --python PY` launches the checkout as our services do (its own custom_nodes, empty
model and input folders) and writes its `/object_info`; `--url` reads a running one."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from model_service.comfy.supervisor import extra_model_paths_yaml
from model_service_testing.comfy_standin.snapshot import (
    OBJECT_INFO,
    PINNED_VERSION,
    write_object_info,
)
from model_service_testing.process import free_port


def read_running(url: str, expect_version: str | None) -> dict[str, Any]:
    stats = httpx.get(f"{url}/system_stats", timeout=30).json()
    version = stats.get("system", {}).get("comfyui_version")
    if expect_version and version != expect_version:
        raise SystemExit(f"{url} runs ComfyUI {version}, not {expect_version}")
    nodes: dict[str, Any] = httpx.get(f"{url}/object_info", timeout=120).json()
    return nodes


@contextlib.contextmanager
def launched(comfyui_dir: Path, python: str, port: int) -> Iterator[str]:
    """The checkout at `comfyui_dir` on the CPU, its folders (but custom_nodes) empty."""
    with tempfile.TemporaryDirectory(prefix="comfy-snapshot-") as base:
        argv = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
        for folder in ("input", "output", "temp", "user"):
            (Path(base) / folder).mkdir()
            argv += [f"--{folder}-directory", str(Path(base) / folder)]
        (Path(base) / "models.yaml").write_text(extra_model_paths_yaml(Path(base) / "models"))
        argv += ["--extra-model-paths-config", str(Path(base) / "models.yaml")]
        argv += ["--database-url", f"sqlite:///{base}/user/comfyui.db", "--disable-auto-launch"]
        log = Path(base) / "comfyui.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=comfyui_dir, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"ComfyUI exited ({proc.returncode}):\n{log.read_text()}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/system_stats", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"ComfyUI not ready after 300 s:\n{log.read_text()}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--comfyui-dir", type=Path, help="a ComfyUI checkout to launch")
    source.add_argument("--url", help="a running ComfyUI to read")
    parser.add_argument("--python", default=sys.executable, help="ComfyUI's interpreter")
    parser.add_argument("--expect-version", default=PINNED_VERSION)
    parser.add_argument("--out", type=Path, default=OBJECT_INFO)
    args = parser.parse_args(argv)
    if args.url:
        nodes = read_running(args.url, args.expect_version)
    else:
        with launched(args.comfyui_dir, args.python, free_port()) as url:
            nodes = read_running(url, args.expect_version)
    write_object_info(nodes, args.out)
    print(f"{args.out}: {len(nodes)} node classes, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
