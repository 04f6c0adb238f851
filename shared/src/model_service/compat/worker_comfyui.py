"""RunPod's worker-comfyui, drop-in: its request runs as our custom workflow, its answer
comes back in its shape (github.com/runpod-workers/worker-comfyui, handler.py and README.md
at d2a5572).

Request: `{"workflow": {API-format graph}, "images": [{"name", "image": base64 | data
URI}], "comfy_org_api_key"?}` (the job's `input`; worker-comfyui also takes it as a JSON
string). Told from our own custom input (`{"workflow", "files"}`) by `files`: a workflow
without `files` is worker-comfyui's. Each image a node input names becomes one of the
custom job's `files`; the others are dropped (worker-comfyui uploads them all to ComfyUI's
input folder, where nothing reads them).

Answer: `{"images": [{"filename", "type": "base64" | "s3_url", "data"}]}` (every output,
in our names: `node9.png`), or `{"status": "success_no_images", "images": []}`; a failure
is `{"error": "<code>: <message>", "details": [...]}` like its handler's.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model_service.custom_input import FILE_NAME_PATTERN
from model_service.errors import InvalidInput
from model_service.jobs.view import Output

KEYS = ("workflow", "images", "comfy_org_api_key")  # what worker-comfyui's handler reads
ROUTE = "/v1/compat/worker-comfyui"


def parsed(raw_input: Any) -> Any:
    """The input; worker-comfyui's `validate_input` also takes it as a JSON string."""
    if isinstance(raw_input, str):
        try:
            return json.loads(raw_input)
        except ValueError:
            return raw_input
    return raw_input


def is_request(raw_input: Any) -> bool:
    """worker-comfyui's input: a workflow without our `files`."""
    return isinstance(raw_input, dict) and "workflow" in raw_input and "files" not in raw_input


def to_custom_input(request: Mapping[str, Any]) -> dict[str, Any]:
    """Our custom-workflow input (`{"workflow", "files"}`); InvalidInput naming the field."""
    unknown = sorted(set(request) - set(KEYS))
    if unknown:
        raise InvalidInput(
            f"input.{unknown[0]}: not a worker-comfyui input; it takes {', '.join(KEYS)}",
            field=f"input.{unknown[0]}",
        )
    if request.get("comfy_org_api_key"):
        raise InvalidInput(
            "input.comfy_org_api_key: ComfyUI's API nodes (Comfy.org) are not available on "
            "this service; leave the key out",
            field="input.comfy_org_api_key",
        )
    images = request.get("images") or []
    if not isinstance(images, list):
        raise InvalidInput(
            "input.images: must be a list of {name, image} objects", field="input.images"
        )
    used = _named_strings(request["workflow"])
    files: dict[str, str] = {}
    seen: set[str] = set()
    for index, image in enumerate(images):
        field = f"input.images.{index}"
        if not (
            isinstance(image, dict)
            and isinstance(image.get("name"), str)
            and isinstance(image.get("image"), str)
        ):
            raise InvalidInput(
                f"{field}: each image is an object with string `name` and `image` (base64 "
                "or a data URI)",
                field=field,
            )
        name = image["name"]
        if name in seen:
            raise InvalidInput(f"{field}.name: {name!r} is given twice", field=f"{field}.name")
        seen.add(name)
        if not re.match(FILE_NAME_PATTERN, name):
            raise InvalidInput(
                f"{field}.name: {name!r} is not a file name here: letters, digits, '.', '_' "
                "and '-', at most 100, no folders",
                field=f"{field}.name",
            )
        if name in used:
            files[name] = _data_uri(image["image"])
    return {"workflow": request["workflow"], "files": files}


def _named_strings(workflow: Any) -> set[str]:
    """Every string a node input holds (the names a loader could read)."""
    if not isinstance(workflow, dict):
        return set()  # the custom input's check says what is wrong
    found: set[str] = set()
    for node in workflow.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            found.update(value for value in inputs.values() if isinstance(value, str))
    return found


def _data_uri(image: str) -> str:
    """Like worker-comfyui's `upload_images`: whatever follows the first comma is the
    base64 data (a data URI's declared type is not trusted there either)."""
    data = image.split(",", 1)[1] if "," in image else image
    return f"data:application/octet-stream;base64,{data.strip()}"


def images(
    outputs: list[Output], directory: Path, max_inline_bytes: int
) -> list[dict[str, Any]] | None:
    """The outputs as worker-comfyui's `images`: uploaded ones as `s3_url`, the rest
    inline as `base64`; None when the inline ones are over `max_inline_bytes` (checked
    before any file is read)."""
    inline = [out for out in outputs if out.storage_url is None]
    sizes = sum((directory / out.name).stat().st_size for out in inline)
    if 4 * ((sizes + 2) // 3) > max_inline_bytes:
        return None
    listed = []
    for out in outputs:
        if out.storage_url is not None:
            listed.append({"filename": out.name, "type": "s3_url", "data": out.storage_url})
        else:
            data = base64.b64encode((directory / out.name).read_bytes()).decode()
            listed.append({"filename": out.name, "type": "base64", "data": data})
    return listed


def answer(listed: list[dict[str, Any]]) -> dict[str, Any]:
    """worker-comfyui's success answer (its handler's `final_result`)."""
    if not listed:
        return {"status": "success_no_images", "images": []}
    return {"images": listed}


def failure(error: Mapping[str, Any], refresh_worker: bool = False) -> dict[str, Any]:
    """worker-comfyui's failure: `error` a string (ours: `<code>: <message>`), `details`
    the problems' messages where there are several."""
    result: dict[str, Any] = {"error": f"{error.get('code', 'error')}: {error.get('message', '')}"}
    problems = error.get("problems")
    if isinstance(problems, list) and problems:
        result["details"] = [f"{p.get('field')}: {p.get('message')}" for p in problems]
    if refresh_worker:
        result["refresh_worker"] = True
    return result


def too_large(max_inline_bytes: int) -> dict[str, Any]:
    return {
        "code": "output_too_large",
        "message": "the outputs are too large to return inline (at most "
        f"{max_inline_bytes} bytes of base64); set BUCKET_ENDPOINT_URL, "
        "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY (or S3_BUCKET) to get S3 URLs",
        "limit_bytes": max_inline_bytes,
    }
