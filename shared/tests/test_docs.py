"""The README's configuration table is the settings object's."""

from pathlib import Path

from model_service.config_docs import BEGIN, END, config_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_table_matches_settings() -> None:
    text = README.read_text()
    table = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert table == config_table(), "run `make docs`"
