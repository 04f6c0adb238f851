"""The project's reference ComfyUI object_info (../shared beside the repository)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
OBJECT_INFO = REPO.parent / "shared" / "reference" / "comfyui-0.33.0-object_info.json"
needs_reference = pytest.mark.skipif(
    not OBJECT_INFO.is_file(),
    reason=f"{OBJECT_INFO} is missing: the stand-in ComfyUI needs the project's reference "
    "object_info (../shared beside the repository)",
)
