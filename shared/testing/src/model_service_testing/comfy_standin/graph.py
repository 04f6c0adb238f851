"""Node catalogue and graph validation for the stand-in, behaving like ComfyUI 0.33.

The node definitions come from an `/object_info` snapshot of a real ComfyUI (the pinned
version's, vendored: `snapshot.OBJECT_INFO`). Validation reproduces what ComfyUI answers
on `POST /prompt`:
the same error types, messages, `details` and `extra_info`, the same quirks (a link to a
missing node is an exception during validation; V3 dynamic inputs such as `SaveVideo`'s
`format` are expanded into dotted names like `format.codec`, and an unknown option is
silently skipped). Written from the observed protocol; no ComfyUI code.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_service.comfy.workflow import MODEL_INPUTS, combo_choices
from model_service_testing.comfy_standin.snapshot import load_object_info

Spec = list[Any]  # [type, {options}] as /object_info lists an input
Sections = dict[str, dict[str, Spec]]  # {"required": {name: spec}, "optional": {...}}
Graph = dict[str, Any]
Error = dict[str, Any]

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
AUTOGROW = "COMFY_AUTOGROW_V3"
DYNAMIC_SLOT = "COMFY_DYNAMICSLOT_V3"
WILDCARD_TYPES = {"*", "COMFY_MATCHTYPE_V3", "COMFY_ANYTYPE_V3"}


# Inputs naming a file in input/, checked by the node's own validation (not as a combo).
INPUT_FILE_INPUTS: dict[tuple[str, str], str] = {
    ("LoadImage", "image"): "Invalid image file: {}",
    ("LoadImageMask", "image"): "Invalid image file: {}",
    ("LoadAudio", "audio"): "Invalid audio file: {}",
    ("LoadVideo", "file"): "Invalid video file: {}",
}
INPUT_FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"),
    "audio": (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac"),
    "file": (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif"),
}


class Catalog:
    """Node definitions from an /object_info snapshot, with live file lists filled in."""

    def __init__(
        self,
        nodes: dict[str, dict[str, Any]],
        model_files: Callable[[str], list[str]],
        input_files: Callable[[], list[str]],
    ) -> None:
        self._nodes = nodes
        self._model_files = model_files
        self._input_files = input_files

    @classmethod
    def load(
        cls,
        path: Path,
        model_files: Callable[[str], list[str]],
        input_files: Callable[[], list[str]],
    ) -> Catalog:
        return cls(load_object_info(path), model_files, input_files)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._nodes

    def names(self) -> list[str]:
        return list(self._nodes)

    def raw(self, class_type: str) -> dict[str, Any]:
        return self._nodes[class_type]

    def is_output(self, class_type: str) -> bool:
        return bool(self._nodes[class_type].get("output_node"))

    def return_types(self, class_type: str) -> list[Any]:
        return list(self._nodes[class_type].get("output") or [])

    def info(self, class_type: str) -> dict[str, Any]:
        """What `/object_info/{class}` answers: the snapshot with live file combos."""
        node = self._nodes[class_type]
        live = self._live_inputs(class_type)
        if not live:
            return node
        node = copy.deepcopy(node)
        for (section, name), files in live.items():
            spec = node["input"][section][name]
            _set_combo_options(spec, files)
        return node

    def inputs(self, class_type: str) -> Sections:
        sections: Sections = self.info(class_type).get("input") or {}
        return {k: v for k, v in sections.items() if k in ("required", "optional")}

    def _live_inputs(self, class_type: str) -> dict[tuple[str, str], list[str]]:
        sections = self._nodes[class_type].get("input") or {}
        live: dict[tuple[str, str], list[str]] = {}
        for section in ("required", "optional"):
            for name, spec in (sections.get(section) or {}).items():
                files = self._files_for(class_type, name, spec)
                if files is not None:
                    live[(section, name)] = files
        return live

    def _files_for(self, class_type: str, name: str, spec: Spec) -> list[str] | None:
        folder = MODEL_INPUTS.get((class_type, name))
        if folder is not None:
            fixed = [o for o in combo_choices(spec) if "." not in o]  # e.g. "pixel_space"
            return sorted(self._model_files(folder)) + fixed
        if (class_type, name) in INPUT_FILE_INPUTS:
            suffixes = INPUT_FILE_SUFFIXES.get(name, ())
            return sorted(f for f in self._input_files() if f.lower().endswith(suffixes))
        return None


def _set_combo_options(spec: Spec, files: list[str]) -> None:
    if isinstance(spec[0], list):
        spec[0] = files
    elif len(spec) > 1 and isinstance(spec[1], dict):
        spec[1]["options"] = files


# --- validation --------------------------------------------------------------------


@dataclass
class Validation:
    ok: bool
    error: Error | None
    outputs: list[str]
    node_errors: dict[str, Any]
    prompt: Graph = field(default_factory=dict)  # with values converted (INT, FLOAT, ...)


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _spec_options(spec: Spec) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _types_compatible(received: Any, expected: Any) -> bool:
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    if got & WILDCARD_TYPES or want & WILDCARD_TYPES:
        return True
    return bool(got & want)


def expand_inputs(sections: Sections, live: dict[str, Any]) -> tuple[Sections, bool]:
    """Expand V3 dynamic inputs (combos, autogrow, slots) into flat dotted names."""
    out: Sections = {"required": {}, "optional": {}}
    dynamic = _expand_into(out, live, sections, [])
    return out, dynamic


def _expand_into(
    out: Sections, live: dict[str, Any], sections: Sections, prefix: list[str]
) -> bool:
    dynamic = bool(prefix)
    for section, inputs in sections.items():
        if section not in ("required", "optional"):
            continue
        for name, spec in inputs.items():
            path = [*prefix, name]
            kind = spec[0]
            if kind == DYNAMIC_COMBO:
                dynamic |= _expand_combo(out, live, spec, section, path)
            elif kind == AUTOGROW:
                dynamic |= _expand_autogrow(out, live, spec, path)
            elif kind == DYNAMIC_SLOT:
                dynamic |= _expand_slot(out, live, spec, section, path)
            else:
                out[section][".".join(path)] = spec
    return dynamic


def _expand_combo(
    out: Sections, live: dict[str, Any], spec: Spec, section: str, path: list[str]
) -> bool:
    key = ".".join(path)
    if key not in live:
        return False
    chosen = next(
        (o for o in _spec_options(spec).get("options", []) if o.get("key") == live[key]), None
    )
    if chosen is None:
        return False  # ComfyUI skips an unknown option silently; the node fails at run time
    _expand_into(out, live, chosen.get("inputs") or {}, path)
    out[section][key] = spec
    return True


def _expand_autogrow(out: Sections, live: dict[str, Any], spec: Spec, path: list[str]) -> bool:
    template = _spec_options(spec).get("template") or {}
    section_of, inner = next(
        ((s, d) for s, d in (template.get("input") or {}).items() if d), ("required", {})
    )
    if not inner:
        return False
    item_spec = next(iter(inner.values()))
    if "names" in template:
        names = list(template["names"])
    else:
        names = [f"{template.get('prefix', '')}{i}" for i in range(int(template.get("max", 0)))]
    minimum = int(template.get("min", 0))
    for i, name in enumerate(names):
        section = "required" if i < minimum and section_of == "required" else "optional"
        _expand_into(out, live, {section: {name: item_spec}}, path)
    return True


def _expand_slot(
    out: Sections, live: dict[str, Any], spec: Spec, section: str, path: list[str]
) -> bool:
    key = ".".join(path)
    if key not in live:
        return False
    _expand_into(out, live, _spec_options(spec).get("inputs") or {}, path)
    out[section][key] = spec
    return True


class Validator:
    """`validate_prompt` as ComfyUI does it; one instance per request."""

    def __init__(self, catalog: Catalog, input_exists: Callable[[str], bool]) -> None:
        self._catalog = catalog
        self._input_exists = input_exists

    def validate_prompt(self, prompt: Any, targets: list[str] | None = None) -> Validation:
        if not isinstance(prompt, dict):
            return Validation(
                False, _error("invalid_prompt", "Prompt must be an object", ""), [], {}
            )
        prompt = copy.deepcopy(prompt)
        outputs, error = self._find_outputs(prompt, targets)
        if error is not None:
            return Validation(False, error, [], {})
        validated: dict[str, tuple[bool, list[Error]]] = {}
        good, failures, node_errors = self._validate_outputs(prompt, outputs, validated)
        if good:
            return Validation(True, None, good, node_errors, prompt)
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failures for e in errs)
        error = _error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
        )
        return Validation(False, error, [], node_errors, prompt)

    def _find_outputs(
        self, prompt: Graph, targets: list[str] | None
    ) -> tuple[list[str], Error | None]:
        outputs: list[str] = []
        for node_id, node in prompt.items():
            node = node if isinstance(node, dict) else {}
            title = (node.get("_meta") or {}).get("title")
            if "class_type" not in node:
                message = (
                    f"Node '{title or f'ID #{node_id}'}' has no class_type. The workflow may be "
                    "corrupted or a custom node is missing."
                )
                return [], _missing_node(message, node_id, None, title)
            class_type = node["class_type"]
            if class_type not in self._catalog:
                message = (
                    f"Node '{title or class_type}' not found. The custom node may not be installed."
                )
                return [], _missing_node(message, node_id, class_type, title or class_type)
            if self._catalog.is_output(class_type) and (targets is None or node_id in targets):
                outputs.append(node_id)
        if not outputs:
            return [], _error("prompt_no_outputs", "Prompt has no outputs", "")
        return outputs, None

    def _validate_outputs(
        self, prompt: Graph, outputs: list[str], validated: dict[str, tuple[bool, list[Error]]]
    ) -> tuple[list[str], list[tuple[str, list[Error]]], dict[str, Any]]:
        good: list[str] = []
        failures: list[tuple[str, list[Error]]] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            try:
                ok, reasons = self._validate_node(prompt, output, validated, [])
            except Exception as exc:  # as ComfyUI: a crash while validating is a reason
                ok, reasons = False, [_exception_reason("exception_during_validation", exc)]
                validated[output] = (False, reasons)
            if ok:
                good.append(output)
                continue
            failures.append((output, reasons))
            _collect_node_errors(prompt, validated, output, node_errors)
        return good, failures, node_errors

    def _validate_node(
        self,
        prompt: Graph,
        node_id: str,
        validated: dict[str, tuple[bool, list[Error]]],
        visiting: list[str],
    ) -> tuple[bool, list[Error]]:
        if node_id in validated:
            return validated[node_id]
        if node_id in visiting:
            return self._cycle(prompt, node_id, validated, visiting)
        node = prompt[node_id]
        class_type = node["class_type"]
        inputs = node.setdefault("inputs", {})
        sections, dynamic = expand_inputs(self._catalog.inputs(class_type), inputs)
        errors: list[Error] = []
        valid = True
        for category in ("required", "optional"):
            for name, spec in sections[category].items():
                if name not in inputs:
                    if category == "required":
                        errors.append(_missing_input(name, dynamic))
                    continue
                value = inputs[name]
                if isinstance(value, list):
                    ok, error = self._check_link(prompt, node_id, name, spec, validated, visiting)
                    valid &= ok
                else:
                    error = self._check_value(class_type, inputs, name, spec)
                if error is not None:
                    errors.append(error)
        earlier = validated.get(node_id, (True, []))
        result = (
            earlier[0] and valid and not errors,
            earlier[1] + [e for e in errors if e not in earlier[1]],
        )
        validated[node_id] = result
        return result

    def _cycle(
        self,
        prompt: Graph,
        node_id: str,
        validated: dict[str, tuple[bool, list[Error]]],
        visiting: list[str],
    ) -> tuple[bool, list[Error]]:
        path = [*visiting[visiting.index(node_id) :], node_id]
        members = list(dict.fromkeys(path))
        text = " -> ".join(f"{n} ({prompt[n]['class_type']})" for n in path)
        for member in members:
            reason = _error("dependency_cycle", "Dependency cycle detected", text)
            reason["extra_info"] = {"node_id": member, "cycle_nodes": members}
            validated[member] = (False, [reason])
        return validated[node_id]

    def _check_link(
        self,
        prompt: Graph,
        node_id: str,
        name: str,
        spec: Spec,
        validated: dict[str, tuple[bool, list[Error]]],
        visiting: list[str],
    ) -> tuple[bool, Error | None]:
        link = prompt[node_id]["inputs"][name]
        info = [spec[0], _spec_options(spec)]
        if len(link) != 2:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            extra = {"input_name": name, "input_config": info, "received_value": link}
            return True, _error("bad_linked_input", message, name, extra)
        source, slot = link
        received = self._catalog.return_types(prompt[source]["class_type"])[slot]  # may raise
        if not _types_compatible(received, spec[0]):
            details = f"{name}, received_type({received}) mismatch input_type({spec[0]})"
            extra = {
                "input_name": name,
                "input_config": info,
                "received_type": received,
                "linked_node": link,
            }
            return True, _error(
                "return_type_mismatch", "Return type mismatch between linked nodes", details, extra
            )
        try:
            visiting.append(node_id)
            try:
                ok, _ = self._validate_node(prompt, source, validated, visiting)
            finally:
                visiting.pop()
        except Exception as exc:
            reason = _exception_reason("exception_during_inner_validation", exc)
            reason["extra_info"].update(
                {"input_name": name, "input_config": info, "linked_node": link}
            )
            reason["extra_info"]["exception_message"] = str(exc)
            validated[source] = (False, [reason])
            return False, None
        return ok, None

    def _check_value(
        self, class_type: str, inputs: dict[str, Any], name: str, spec: Spec
    ) -> Error | None:
        kind, options = spec[0], _spec_options(spec)
        info = [kind, options]
        value = inputs[name]
        if isinstance(value, dict) and "__value__" in value:
            value = inputs[name] = value["__value__"]
        try:
            value = inputs[name] = _convert(kind, value)
        except (TypeError, ValueError) as exc:
            extra = {
                "input_name": name,
                "input_config": info,
                "received_value": value,
                "exception_message": str(exc),
            }
            message = f"Failed to convert an input value to a {kind} value"
            return _error("invalid_input_type", message, f"{name}, {value}, {exc}", extra)
        file_check = INPUT_FILE_INPUTS.get((class_type, name))
        if file_check is not None:  # the node validates this input itself
            if self._input_exists(str(value)):
                return None
            return _error(
                "custom_validation_failed",
                "Custom validation failed for node",
                f"{name} - {file_check.format(value)}",
                {"input_name": name},
            )
        return _check_range(name, value, info) or _check_combo(name, value, kind, options, info)


def _convert(kind: Any, value: Any) -> Any:
    if kind == "INT":
        return int(value)
    if kind == "FLOAT":
        return float(value)
    if kind == "STRING":
        return str(value)
    if kind == "BOOLEAN":
        return bool(value)
    return value


def _check_range(name: str, value: Any, info: list[Any]) -> Error | None:
    options = info[1]
    extra = {"input_name": name, "input_config": info, "received_value": value}
    try:
        if "min" in options and value < options["min"]:
            message = f"Value {value} smaller than min of {options['min']}"
            return _error("value_smaller_than_min", message, name, extra)
        if "max" in options and value > options["max"]:
            message = f"Value {value} bigger than max of {options['max']}"
            return _error("value_bigger_than_max", message, name, extra)
    except TypeError:
        return None
    return None


def _check_combo(
    name: str, value: Any, kind: Any, options: dict[str, Any], info: list[Any]
) -> Error | None:
    if not (isinstance(kind, list) or kind == "COMBO") or options.get("remote_combo"):
        return None
    choices = kind if isinstance(kind, list) else list(options.get("options") or [])
    values = value if options.get("multiselect") and isinstance(value, list) else [value]
    bad = [v for v in values if v not in choices]
    if not bad:
        return None
    listing = f"(list of length {len(choices)})" if len(choices) > 20 else str(choices)
    config = None if len(choices) > 20 else info
    details = f"{name}: {', '.join(repr(v) for v in bad)} not in {listing}"
    extra = {"input_name": name, "input_config": config, "received_value": value}
    return _error("value_not_in_list", "Value not in list", details, extra)


def _error(kind: str, message: str, details: str, extra: dict[str, Any] | None = None) -> Error:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


def _missing_node(message: str, node_id: str, class_type: str | None, title: str | None) -> Error:
    extra = {"node_id": node_id, "class_type": class_type, "node_title": title}
    return _error("missing_node_type", message, f"Node ID '#{node_id}'", extra)


def _missing_input(name: str, dynamic: bool) -> Error:
    details = name.split(".")[-1] if dynamic else name
    return _error(
        "required_input_missing", "Required input is missing", details, {"input_name": name}
    )


def _exception_reason(kind: str, exc: BaseException) -> Error:
    message = (
        "Exception when validating node"
        if kind == "exception_during_validation"
        else ("Exception when validating inner node")
    )
    extra = {"exception_type": _type_name(exc), "traceback": traceback.format_tb(exc.__traceback__)}
    return _error(kind, message, str(exc), extra)


def _collect_node_errors(
    prompt: Graph,
    validated: dict[str, tuple[bool, list[Error]]],
    output: str,
    node_errors: dict[str, Any],
) -> None:
    """Nodes with their own errors, each listing the outputs that depend on it."""
    for node_id, (ok, reasons) in validated.items():
        if ok or not reasons:
            continue  # downstream of a bad node: invalid but with nothing of its own to say
        entry = node_errors.setdefault(
            node_id,
            {
                "errors": reasons,
                "dependent_outputs": [],
                "class_type": prompt[node_id]["class_type"],
            },
        )
        entry["dependent_outputs"].append(output)
