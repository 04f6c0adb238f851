"""The σ each model call of a real ComfyUI receives, recorded by the custom-node package
`comfy_nodes/model_service_sigma_probe` (loaded through an extra `custom_nodes` path).

`probe_env(root)` is the environment for a service (or ComfyUI) process; `SigmaLog` reads
what was recorded. Tests compare it with the schedules our workflows are meant to run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

NODES_DIR = Path(__file__).parent / "comfy_nodes"
ENV = "MODEL_SERVICE_SIGMA_PROBE"


class SigmaLog:
    """One file of recorded model calls."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def clear(self) -> None:
        self.path.write_text("")

    def calls(self) -> list[tuple[str, list[float]]]:
        """(model class, σ per batch item) for each model call since the last `clear`."""
        if not self.path.exists():
            return []
        lines = (json.loads(line) for line in self.path.read_text().splitlines() if line)
        return [(line["model"], line["sigmas"]) for line in lines]

    def sigmas(self) -> list[float]:
        """The σ of each call, in order (each call's batch shares one σ)."""
        found = []
        for _, sigmas in self.calls():
            assert len(set(sigmas)) == 1, f"one model call with several σ: {sigmas}"
            found.append(sigmas[0])
        return found


def probe_env(root: Path) -> tuple[dict[str, str], SigmaLog]:
    """Environment that makes the ComfyUI a service launches load the probe (an extra
    `custom_nodes` path through COMFYUI_ARGS) and record into `root/sigmas.jsonl`."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "sigma_probe_paths.yaml"
    config.write_text(f"sigma_probe:\n    custom_nodes: {json.dumps(str(NODES_DIR))}\n")
    log = SigmaLog(root / "sigmas.jsonl")
    log.clear()
    env = {
        ENV: str(log.path),
        "COMFYUI_ARGS": f"--extra-model-paths-config {shlex.quote(str(config))}",
    }
    return env, log
