"""Custom workflows: a job that brings its own ComfyUI graph (API format) instead of the
service's typed input, run by the same engine (ALLOW_CUSTOM_WORKFLOWS=1).

`{"workflow": {node id: {"class_type", "inputs"}}, "files": {name: URL | data URI |
upload id}}`: a file loader's input (LoadImage, LoadImageMask, LoadAudio, LoadVideo)
names one of `files`; the service fetches and checks each file as for typed inputs, the
engine uploads it to ComfyUI and puts ComfyUI's name in its place. Before the job is
queued the graph is checked against the running ComfyUI's `/object_info` (node classes,
required inputs, links, model files and other choices, an output node) and the node
allow/deny lists; a problem is a 422 naming the node and input. Every output the graph
makes comes back, named after its node (`node<id>.<ext>`, then `node<id>_1.<ext>`, ...).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from model_service.comfy.workflow import combo_choices, is_link, node_order
from model_service.custom_input import FILE_NAME_PATTERN, images_error
from model_service.errors import InvalidInput
from model_service.media_refs import MediaKind
from model_service.settings import Settings

# the loader inputs that name a file in ComfyUI's input folder: which kind of file
FILE_INPUTS: dict[tuple[str, str], MediaKind] = {
    ("LoadImage", "image"): "image",
    ("LoadImageMask", "image"): "image",
    ("LoadAudio", "audio"): "audio",
    ("LoadVideo", "file"): "video",
}
MAX_NODES = 1000
MAX_FILES = 32

FileName = Annotated[str, StringConstraints(pattern=FILE_NAME_PATTERN)]


class WorkflowNode(BaseModel):
    model_config = ConfigDict(extra="allow")  # `_meta` and the like are kept as they are

    class_type: str = Field(min_length=1, max_length=200)
    inputs: dict[str, Any] = Field(default_factory=dict)


class CustomWorkflowInput(BaseModel):
    """A ComfyUI workflow of your own (API format: ComfyUI's "Export (API)")."""

    model_config = ConfigDict(extra="forbid")

    workflow: dict[str, WorkflowNode] = Field(
        min_length=1,
        max_length=MAX_NODES,
        description="The graph in API format: {node id: {class_type, inputs}}; a loader's "
        "file input (LoadImage.image, LoadAudio.audio, LoadVideo.file) names one of `files`.",
    )
    files: dict[FileName, str] = Field(
        default_factory=dict,
        max_length=MAX_FILES,
        description="The graph's input files by name: https URL, data URI or upload id.",
    )

    @model_validator(mode="before")
    @classmethod
    def _not_worker_comfyui(cls, data: Any) -> Any:
        """worker-comfyui's `images` gets an answer naming `files` (InvalidInput is not a
        ValueError: pydantic lets it through as it is)."""
        if isinstance(data, dict) and "images" in data:
            raise images_error()
        return data


class CustomWorkflows:
    """Checks custom workflows for the submitter (the engine runs them): the ComfyUI
    engine's `submit.CustomInput`."""

    model = CustomWorkflowInput

    def __init__(
        self, settings: Settings, object_info: Callable[[], Awaitable[Mapping[str, Any]]]
    ) -> None:
        self._allow = set(settings.custom_workflow_nodes_allow)
        self._deny = set(settings.custom_workflow_nodes_deny)
        self._object_info = object_info

    async def check(self, request: CustomWorkflowInput) -> dict[str, MediaKind]:
        """Raises InvalidInput naming the first problem (all of them in `problems`);
        returns the kind of each file."""
        graph = {node_id: node.model_dump() for node_id, node in request.workflow.items()}
        object_info = await self._object_info()
        problems = graph_problems(graph, set(request.files), object_info, self._allow, self._deny)
        kinds = file_kinds(graph, set(request.files))
        for name in sorted(set(request.files) - set(kinds)):
            problems.append(
                {
                    "field": f"input.files.{name}",
                    "message": f"no loader input (LoadImage, LoadAudio, LoadVideo) names {name!r}",
                }
            )
        if problems:
            first = problems[0]
            raise InvalidInput(
                f"{first['field']}: {first['message']}"
                + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""),
                field=first["field"],
                problems=problems,
            )
        return kinds


def file_kinds(graph: Mapping[str, Any], files: set[str]) -> dict[str, MediaKind]:
    kinds: dict[str, MediaKind] = {}
    for node in graph.values():
        for input_name, value in (node.get("inputs") or {}).items():
            kind = FILE_INPUTS.get((node["class_type"], input_name))
            if kind is not None and isinstance(value, str) and value in files:
                kinds[value] = kind
    return kinds


def graph_problems(
    graph: Mapping[str, Any],
    files: set[str],
    object_info: Mapping[str, Any],
    allow: set[str],
    deny: set[str],
) -> list[dict[str, str]]:
    """What keeps the graph from running on this ComfyUI, one {field, message} each."""
    problems: list[dict[str, str]] = []

    def problem(node_id: str, input_name: str | None, message: str) -> None:
        field = f"input.workflow.{node_id}" + (f".inputs.{input_name}" if input_name else "")
        problems.append({"field": field, "message": message})

    has_output = False
    for node_id, node in sorted(graph.items(), key=lambda item: node_order(item[0])):
        class_type = node["class_type"]
        where = f"node {node_id} ({class_type})"
        if class_type in deny or (allow and class_type not in allow):
            problem(node_id, None, f"{where}: node class not allowed on this service")
            continue
        info = object_info.get(class_type)
        if not isinstance(info, dict):
            problem(node_id, None, f"{where}: ComfyUI has no such node class")
            continue
        has_output = has_output or bool(info.get("output_node"))
        sections = info.get("input") or {}
        required = sections.get("required") or {}
        declared = {**(sections.get("optional") or {}), **required}
        inputs = node.get("inputs") or {}
        for input_name in required:
            if input_name not in inputs:
                problem(node_id, input_name, f"{where}: required input {input_name!r} missing")
        for input_name, value in inputs.items():
            if is_link(value):
                if value[0] not in graph:
                    problem(node_id, input_name, f"{where}: links to node {value[0]}, not in graph")
                continue
            if (class_type, input_name) in FILE_INPUTS and value in files:
                continue  # uploaded when the job runs
            choices = combo_choices(declared.get(input_name))
            if (class_type, input_name) in FILE_INPUTS and value not in choices:
                problem(
                    node_id,
                    input_name,
                    f"{where}: {input_name}={value!r} names no file: give it in `files` "
                    "(URL, data URI or upload id)",
                )
            elif choices and isinstance(value, str) and value not in choices:
                shown = ", ".join(repr(c) for c in choices[:10])
                more = f" (and {len(choices) - 10} more)" if len(choices) > 10 else ""
                problem(
                    node_id,
                    input_name,
                    f"{where}: {input_name}={value!r} is not one of ComfyUI's choices: "
                    f"{shown}{more}"
                    + (
                        "; or name one of `files`"
                        if (class_type, input_name) in FILE_INPUTS
                        else ""
                    ),
                )
    if not has_output and not problems:
        problems.append(
            {
                "field": "input.workflow",
                "message": "the workflow has no output node (SaveImage, SaveVideo, SaveAudio, "
                "...): it would make nothing",
            }
        )
    return problems
