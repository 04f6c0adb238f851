"""A service's ComfyUI workflow: an API-format graph file plus declarative bindings.

The graph is what ComfyUI's "Export (API)" writes; it stays loadable in ComfyUI as is.
The bindings say which request field goes to which node input::

    FASTWAN = Workflow.load(
        HERE / "workflows" / "fastwan_ti2v.json",
        bind={
            "prompt": "6.text",
            "seed": "3.seed",
            "start_image": Bind("56.image", media="image"),
        },
        only_when={"56": "start_image"},  # LoadImage exists only with a start image
        outputs={"58": "video"},
    )

`build(values)` returns a fresh graph with the values in place: a field that is absent
(None) keeps the graph's own value, a node listed in `only_when` is dropped (with the
links to it) unless its field is set, and every `filename_prefix` gets the job's tag so
two jobs never share an output name (nor a ComfyUI cache entry). `check(object_info)`
lists what the running ComfyUI lacks: node classes, bound inputs, model files.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Graph = dict[str, Any]

# Inputs whose choices ComfyUI fills from a models folder (what a missing file looks like).
MODEL_INPUTS: dict[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("CheckpointLoader", "ckpt_name"): "checkpoints",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
    ("unCLIPCheckpointLoader", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name1"): "text_encoders",
    ("TripleCLIPLoader", "clip_name2"): "text_encoders",
    ("TripleCLIPLoader", "clip_name3"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("ModelPatchLoader", "name"): "model_patches",
    ("AudioEncoderLoader", "audio_encoder_name"): "audio_encoders",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
}

MediaKind = Literal["image", "audio", "video"]


@dataclass(frozen=True)
class Bind:
    """Where one request field goes: `"<node id>.<input>"`, one or several targets.

    `media`: the field's value is a local file; the engine uploads it to ComfyUI and
    binds the name ComfyUI gave it. `convert` maps the request value to the input's.
    """

    targets: tuple[str, ...]
    media: MediaKind | None = None
    convert: Callable[[Any], Any] | None = None

    def __init__(
        self,
        *targets: str,
        media: MediaKind | None = None,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        for target in targets:
            node, _, name = target.partition(".")
            if not node or not name:
                raise ValueError(f"binding target {target!r} is not '<node id>.<input>'")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "media", media)
        object.__setattr__(self, "convert", convert)

    def places(self) -> list[tuple[str, str]]:
        return [(t.partition(".")[0], t.partition(".")[2]) for t in self.targets]


@dataclass(frozen=True)
class Workflow:
    name: str
    graph: Mapping[str, Any]
    bind: Mapping[str, Bind]
    only_when: Mapping[str, str] = field(default_factory=dict)  # node id -> field
    outputs: Mapping[str, str] = field(default_factory=dict)  # node id -> our file stem
    # what bindings cannot say (a LoRA chain of any length, a node left out): called
    # with the bound graph and the job's values, changes the graph in place
    adjust: Callable[[Graph, Mapping[str, Any]], None] | None = None

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        bind: Mapping[str, str | Bind],
        only_when: Mapping[str, str] | None = None,
        outputs: Mapping[str, str] | None = None,
        name: str | None = None,
        adjust: Callable[[Graph, Mapping[str, Any]], None] | None = None,
    ) -> Workflow:
        graph = json.loads(path.read_text())
        binds = {k: v if isinstance(v, Bind) else Bind(v) for k, v in bind.items()}
        workflow = cls(
            name or path.stem, graph, binds, dict(only_when or {}), dict(outputs or {}), adjust
        )
        problems = workflow.problems_in_graph()
        if problems:
            raise ValueError(f"workflow {path}: " + "; ".join(problems))
        return workflow

    @property
    def media_fields(self) -> dict[str, MediaKind]:
        return {name: b.media for name, b in self.bind.items() if b.media is not None}

    # --- checks ----------------------------------------------------------------------

    def problems_in_graph(self) -> list[str]:
        """Mistakes in the workflow file or its bindings (a bug in the service)."""
        problems = []
        for node_id, node in self.graph.items():
            if not isinstance(node, dict) or "class_type" not in node:
                problems.append(f"node {node_id} has no class_type (not API format?)")
        for name, binding in self.bind.items():
            for node_id, _ in binding.places():
                if node_id not in self.graph:
                    problems.append(f"field {name!r} is bound to node {node_id}, not in the graph")
        for node_id, name in {**self.only_when, **dict.fromkeys(self.outputs, "")}.items():
            if node_id not in self.graph:
                problems.append(f"node {node_id} ({name or 'output'}) is not in the graph")
        return problems

    def check(
        self, object_info: Mapping[str, Any], describe_file: Callable[[str, str], str] | None = None
    ) -> list[str]:
        """What the running ComfyUI lacks for this workflow, one sentence each.

        `describe_file(folder, name)` can add where a missing model file comes from.
        """
        problems: list[str] = []
        for node_id, node in sorted(self.graph.items(), key=lambda kv: node_order(kv[0])):
            class_type = node["class_type"]
            where = f"workflow {self.name!r} node {node_id}"
            info = object_info.get(class_type)
            if not isinstance(info, dict):
                problems.append(
                    f"ComfyUI has no node class {class_type!r} ({where}); use ComfyUI 0.33 or "
                    "newer, or install the custom node that provides it"
                )
                continue
            declared = _declared_inputs(info)
            for _, (bound_node, input_name) in self._bound_places():
                if bound_node == node_id and input_name not in declared:
                    problems.append(f"{class_type} has no input {input_name!r} ({where})")
            for input_name, value in (node.get("inputs") or {}).items():
                folder = MODEL_INPUTS.get((class_type, input_name))
                if folder is None or not isinstance(value, str):
                    continue
                choices = combo_choices(declared.get(input_name))
                if value not in choices:
                    source = f"; {describe_file(folder, value)}" if describe_file else ""
                    problems.append(
                        f"model file {folder}/{value} is missing ({where}, "
                        f"{class_type}.{input_name}){source}"
                    )
        return problems

    def _bound_places(self) -> list[tuple[str, tuple[str, str]]]:
        return [(name, place) for name, b in self.bind.items() for place in b.places()]

    def model_files(self) -> list[tuple[str, str]]:
        """(folder, file name) of every model file the graph loads."""
        found = []
        for node in self.graph.values():
            for input_name, value in (node.get("inputs") or {}).items():
                folder = MODEL_INPUTS.get((node["class_type"], input_name))
                if folder is not None and isinstance(value, str):
                    found.append((folder, value))
        return found

    # --- building a job's graph --------------------------------------------------------

    def build(self, values: Mapping[str, Any], *, tag: str) -> Graph:
        """The graph for one job. Media values must already be ComfyUI input names."""
        graph: Graph = copy.deepcopy(dict(self.graph))
        for node_id, field_name in self.only_when.items():
            if values.get(field_name) is None:
                graph.pop(node_id, None)
        for node in graph.values():  # links to dropped nodes go too
            inputs = node.setdefault("inputs", {})
            for name in [n for n, v in inputs.items() if is_link(v) and v[0] not in graph]:
                del inputs[name]
        for name, binding in self.bind.items():
            value = values.get(name)
            if value is None:
                continue
            if binding.convert is not None:
                value = binding.convert(value)
            for node_id, input_name in binding.places():
                if node_id in graph:
                    graph[node_id]["inputs"][input_name] = value
        if self.adjust is not None:
            self.adjust(graph, values)
        for node in graph.values():
            prefix = node["inputs"].get("filename_prefix")
            if isinstance(prefix, str):
                node["inputs"]["filename_prefix"] = f"{prefix}_{tag}"
        return graph


def chain_loras(
    graph: Graph, source: str, target: tuple[str, str], loras: Sequence[tuple[str, float]]
) -> list[str]:
    """Put a chain of `LoraLoaderModelOnly` nodes (ComfyUI file name, strength) between
    node `source`'s MODEL output and the `target` (node id, input). New node ids follow
    the largest numeric id. Returns them."""
    added: list[str] = []
    previous = source
    for name, strength in loras:
        node_id = str(max((int(n) for n in graph if n.isdigit()), default=0) + 1)
        graph[node_id] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": [previous, 0], "lora_name": name, "strength_model": strength},
            "_meta": {"title": f"LoRA {name}"},
        }
        added.append(node_id)
        previous = node_id
    graph[target[0]]["inputs"][target[1]] = [previous, 0]
    return added


LAST_FRAME_STEM = "last_frame"


def add_last_frame(graph: Graph, video_node: str) -> str | None:
    """Nodes that save the last frame of the video that `video_node` (a SaveVideo fed by
    a CreateVideo) writes, as a PNG: the exact 8-bit frame the video encoder got, so the
    next segment of a long video starts from it without a lossy round trip through the
    mp4. Returns the SaveImage node's id, or None when the graph is not shaped so."""
    video_input = (graph.get(video_node) or {}).get("inputs", {}).get("video")
    if not is_link(video_input):
        return None
    create = graph.get(video_input[0]) or {}
    images = create.get("inputs", {}).get("images")
    if create.get("class_type") != "CreateVideo" or not is_link(images):
        return None
    top = max((int(n) for n in graph if n.isdigit()), default=0)
    pick, save = str(top + 1), str(top + 2)
    graph[pick] = {
        "class_type": "ImageFromBatch",
        "inputs": {"image": images, "batch_index": -1, "length": 1},
        "_meta": {"title": "Last frame"},
    }
    graph[save] = {
        "class_type": "SaveImage",
        "inputs": {"images": [pick, 0], "filename_prefix": LAST_FRAME_STEM},
        "_meta": {"title": "Save last frame"},
    }
    return save


def sampler_steps(graph: Mapping[str, Any]) -> int:
    """Denoising steps the graph will run in all its samplers (0 when it cannot tell):
    KSampler, KSamplerAdvanced (its start..end range) and SamplerCustomAdvanced (the
    steps of the BasicScheduler that feeds it, or one per interval of ManualSigmas)."""
    total = 0
    for node in graph.values():
        inputs = node.get("inputs") or {}
        kind = node.get("class_type")
        if kind == "KSampler":
            total += _int(inputs.get("steps"))
        elif kind == "KSamplerAdvanced":
            end = min(_int(inputs.get("end_at_step")), _int(inputs.get("steps")))
            total += max(0, end - _int(inputs.get("start_at_step")))
        elif kind == "SamplerCustomAdvanced" and is_link(inputs.get("sigmas")):
            scheduler = graph.get(inputs["sigmas"][0]) or {}
            if scheduler.get("class_type") == "BasicScheduler":
                total += _int(scheduler["inputs"].get("steps"))
            elif scheduler.get("class_type") == "ManualSigmas":
                total += max(0, len(manual_sigmas(scheduler["inputs"].get("sigmas"))) - 1)
    return total


def diffusion_model_of(graph: Mapping[str, Any], node_id: str) -> str | None:
    """The `unet_name` of the `UNETLoader` at the root of a node's `model` input chain
    (through LoRA loaders, model patches, ...); None when the chain ends elsewhere."""
    seen: set[str] = set()
    while node_id not in seen:
        seen.add(node_id)
        node = graph.get(node_id) or {}
        inputs = node.get("inputs") or {}
        if node.get("class_type") == "UNETLoader" and isinstance(inputs.get("unet_name"), str):
            return str(inputs["unet_name"])
        if not is_link(inputs.get("model")):
            return None
        node_id = inputs["model"][0]
    return None


def manual_sigmas(text: Any) -> list[float]:
    """The σ list ComfyUI's ManualSigmas node makes of its string (0.33.0,
    comfy_extras/nodes_custom_sampler.py: the same regular expression)."""
    if not isinstance(text, str):
        return []
    return [float(n) for n in re.findall(r"[-+]?(?:\d*\.*\d+)", text)]


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def node_order(node_id: str) -> tuple[int, str]:
    """Sort key: numeric node ids in number order, others after."""
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def is_link(value: Any) -> bool:
    """An input that is a link to another node's output: `[node id, output index]`."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _declared_inputs(info: Mapping[str, Any]) -> dict[str, Any]:
    sections = info.get("input") or {}
    return {**(sections.get("optional") or {}), **(sections.get("required") or {})}


def combo_choices(spec: Any) -> list[Any]:
    """The choices of a combo input, old style (`[[...], {}]`) or new (`["COMBO", {options}]`);
    a dynamic combo's options (`{key, inputs}`) by their key."""
    if not isinstance(spec, list) or not spec:
        return []
    if isinstance(spec[0], list):
        return list(spec[0])
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return [
        o["key"] if isinstance(o, dict) and "key" in o else o for o in options.get("options") or []
    ]
