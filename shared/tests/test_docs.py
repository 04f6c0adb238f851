"""The READMEs' generated tables: the configuration (the settings object) and each
service's input (its input model)."""

from pathlib import Path

from model_service.config_docs import (
    BEGIN,
    END,
    INPUT_BEGIN,
    INPUT_END,
    config_table,
    service_readmes,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_table_matches_settings() -> None:
    text = README.read_text()
    table = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert table == config_table(), "run `make docs`"


def test_service_readme_input_tables_match_their_input_models() -> None:
    readmes = service_readmes()
    assert len(readmes) >= 4, "every service README has a generated input table"
    for readme, table in readmes.items():
        text = readme.read_text()
        current = text[text.index(INPUT_BEGIN) : text.index(INPUT_END) + len(INPUT_END)]
        assert current == table, f"{readme}: run `make docs`"
