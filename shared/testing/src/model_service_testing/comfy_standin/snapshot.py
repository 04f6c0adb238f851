"""The node schema the stand-in validates against: the pinned ComfyUI's own `/object_info`.

`OBJECT_INFO` is a gzipped snapshot of `GET /object_info` from ComfyUI v0.33.0 (release
commit 2f35f4a08176; the version the ComfyUI images pin), launched as our services launch
it: the checkout's own `custom_nodes` (its example `SaveImageWebsocket` included), empty
input and model folders, so its file lists (checkpoints, LoRAs, input images) are empty:
the stand-in fills them in from its own folders. Regenerate it against a real checkout of
the pinned version:

    python -m model_service_testing.comfy_standin.refresh \\
        --comfyui-dir /path/to/ComfyUI --python /path/to/comfy-venv/bin/python

(or `--url http://127.0.0.1:8188` to read a ComfyUI that is already running). The command
refuses a ComfyUI whose `/system_stats` reports another version than `--expect-version`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

OBJECT_INFO = Path(__file__).with_name("comfyui-0.33.0-object_info.json.gz")
PINNED_VERSION = "0.33.0"


def load_object_info(path: Path = OBJECT_INFO) -> dict[str, Any]:
    """A snapshot as ComfyUI answers `/object_info`: plain or gzipped JSON."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    nodes: dict[str, Any] = json.loads(raw)
    return nodes


def write_object_info(nodes: dict[str, Any], path: Path) -> None:
    """Gzipped with no name or timestamp in the header: the same schema, the same bytes."""
    data = json.dumps(nodes, separators=(",", ":"), ensure_ascii=False).encode()
    with path.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as out:
        out.write(data)
