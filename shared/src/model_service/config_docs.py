"""Tables in the READMEs generated from the code (`make docs`; tests fail when they
disagree): the configuration table of the root README, from the settings object, and each
service README's input table, from the service's input model (its JSON schema)."""

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from model_service.media_refs import media_fields
from model_service.settings import Settings

BEGIN = "<!-- config-table:begin (generated: make docs) -->"
END = "<!-- config-table:end -->"
INPUT_BEGIN = "<!-- input-table:begin (generated: make docs) -->"
INPUT_END = "<!-- input-table:end -->"
REPO = Path(__file__).resolve().parents[3]


def config_table() -> str:
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        unset = field.default_factory is not None or field.default in (PydanticUndefined, None)
        default = "" if unset else f"`{field.default}`"
        text = _cell(field.description or "")
        rows.append(f"| `{name.upper()}` | {default} | {text} |")
    return "\n".join([BEGIN, *rows, END])


def input_table(model: type[BaseModel]) -> str:
    """One row per field of a job's `input`: type, default, limits, description."""
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    media = media_fields(model)
    rows = ["| Field | Type | Default | Limits | What it does |", "|---|---|---|---|---|"]
    for name, field in schema["properties"].items():
        branch = _main_branch(field)
        if name in required:
            default = "required"
        elif field.get("default") is None:
            default = ""
        else:
            default = f"`{_json(field['default'])}`"
        kind = _type(branch, schema)
        if name in media:
            ref = f"{media[name]} (URL, data URI or upload id)"
            kind = f"list of {ref}" if kind.startswith("list") else ref
        limits = _limits(branch, name in media)
        rows.append(
            f"| `{name}` | {kind} | {default} | {_cell(limits)} "
            f"| {_cell(field.get('description', ''))} |"
        )
    return "\n".join([INPUT_BEGIN, *rows, INPUT_END])


def _main_branch(field: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional field."""
    branches: list[dict[str, Any]] = [b for b in field.get("anyOf", []) if b.get("type") != "null"]
    return branches[0] if len(branches) == 1 else field


def _type(branch: dict[str, Any], schema: dict[str, Any]) -> str:
    if "$ref" in branch:
        return "object: " + str(branch["$ref"]).rsplit("/", 1)[-1]
    if "enum" in branch:
        return "one of " + ", ".join(f"`{value}`" for value in branch["enum"])
    if "const" in branch:
        return f"`{branch['const']}`"
    kind = str(branch.get("type", "any"))
    media = str(branch.get("description", "")).split(":", 1)[0]
    if kind == "string" and media in ("Image", "Audio"):
        return f"{media.lower()} (URL, data URI or upload id)"
    if kind == "array":
        return "list of " + _type(branch.get("items", {}), schema)
    return {
        "integer": "integer",
        "number": "number",
        "string": "text",
        "boolean": "true/false",
    }.get(kind, kind)


_TYPES = {"integer": "integer", "number": "number", "string": "text", "boolean": "true/false"}


def _limits(branch: dict[str, Any], media: bool) -> str:
    parts = []
    low, high = branch.get("minimum"), branch.get("maximum")
    if low is not None or high is not None:
        low_text = "" if low is None else _json(low)
        high_text = "" if high is None else _json(high)
        parts.append(f"{low_text}–{high_text}")
    if "multipleOf" in branch:
        parts.append(f"multiple of {_json(branch['multipleOf'])}")
    text = branch.get("type") == "string" and "enum" not in branch and not media
    if text and "maxLength" in branch:
        parts.append(f"{branch.get('minLength', 0)}–{branch['maxLength']} characters")
    if branch.get("type") == "array":
        parts.append(f"{branch.get('minItems', 0)}–{branch.get('maxItems', '')} items")
    return ", ".join(parts)


def _json(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _replace(path: Path, begin: str, end: str, table: str) -> None:
    text = path.read_text()
    start, stop = text.index(begin), text.index(end) + len(end)
    path.write_text(text[:start] + table + text[stop:])


def service_readmes() -> dict[Path, str]:
    """Each service README that has an input table, with the table it should hold."""
    from importlib.metadata import entry_points

    from model_service.cli import ENTRY_POINT_GROUP, load_spec

    found = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        readme = REPO / entry.name / "README.md"
        if readme.is_file() and INPUT_BEGIN in readme.read_text():
            found[readme] = input_table(load_spec(entry.name).input_model)
    return found


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        _replace(Path(sys.argv[2]), BEGIN, END, config_table())
        for readme, table in service_readmes().items():
            _replace(readme, INPUT_BEGIN, INPUT_END, table)
    else:
        print(config_table())
