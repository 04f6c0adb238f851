"""The settings object: environment variables are checked when it is read."""

import pytest
from pydantic import ValidationError

from model_service.settings import Settings


def test_cpu_offload_defaults_to_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CPU_OFFLOAD", raising=False)
    assert Settings().cpu_offload == "auto"


@pytest.mark.parametrize("value", ["none", "model", "sequential"])
def test_cpu_offload_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CPU_OFFLOAD", value)
    assert Settings().cpu_offload == value


def test_unknown_cpu_offload_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPU_OFFLOAD", "bogus")
    with pytest.raises(ValidationError, match="cpu_offload"):
        Settings()
