"""Loaded by a real ComfyUI as a custom-node package (no nodes): when the environment
variable MODEL_SERVICE_SIGMA_PROBE names a file, every model call appends one JSON line to
it, `{"model": <class>, "sigmas": [σ per batch item]}`: the σ that `BaseModel.apply_model`
receives (comfy/model_base.py; it turns σ into the model's timestep itself)."""

from __future__ import annotations

import importlib
import json
import os
import threading
from typing import Any

NODE_CLASS_MAPPINGS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _install(path: str) -> None:
    base = importlib.import_module("comfy.model_base").BaseModel
    original = base.apply_model

    def apply_model(self: Any, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
        line = {"model": type(self).__name__, "sigmas": [float(s) for s in t.flatten().tolist()]}
        with _LOCK, open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")
        return original(self, x, t, *args, **kwargs)

    base.apply_model = apply_model


if os.environ.get("MODEL_SERVICE_SIGMA_PROBE"):
    _install(os.environ["MODEL_SERVICE_SIGMA_PROBE"])
