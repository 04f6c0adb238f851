"""A stand-in ComfyUI for tests: ComfyUI 0.33's protocol, validation against the pinned
ComfyUI's own node schema (`snapshot.OBJECT_INFO`), weight-free nodes run for real.

`python -m model_service_testing.comfy_standin --base-dir DIR` runs the server;
`StandinProcess` starts it as a real process for a test.
"""

from model_service_testing.comfy_standin.server import StandinProcess
from model_service_testing.comfy_standin.snapshot import OBJECT_INFO, load_object_info

__all__ = ["OBJECT_INFO", "StandinProcess", "load_object_info"]
