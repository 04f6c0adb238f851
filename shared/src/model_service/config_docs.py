"""The configuration table in the README, generated from the settings object."""

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from model_service.settings import Settings

BEGIN = "<!-- config-table:begin (generated: make docs) -->"
END = "<!-- config-table:end -->"


def config_table() -> str:
    rows = ["| Variable | Default | What it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        unset = field.default_factory is not None or field.default in (PydanticUndefined, None)
        default = "" if unset else f"`{field.default}`"
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name.upper()}` | {default} | {text} |")
    return "\n".join([BEGIN, *rows, END])


def update_readme(path: Path) -> None:
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + config_table() + text[end:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        update_readme(Path(sys.argv[2]))
    else:
        print(config_table())
