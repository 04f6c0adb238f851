"""Start-up refuses what would run the service wrong, with a clear message and exit code,
never a traceback: blank API keys (which used to start the service open, silently), a
DATA_DIR that cannot be written."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from model_service.settings import Settings
from model_service.startup import EXIT_CONFIG, EXIT_DATA_DIR
from model_service_testing.pytest_plugin import ECHO_MODULE, echo_process


def start_and_exit(tmp_path: Path, env: dict[str, str], data_dir: Path | None = None):
    service = echo_process(data_dir or tmp_path / "data", env)
    return subprocess.run(
        [sys.executable, "-m", ECHO_MODULE],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("value", [" ", ",", " , ", "key-one,,key-two", "key-one,"])
def test_blank_api_keys_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("API_KEYS", value)
    with pytest.raises(ValidationError, match="API_KEYS"):
        Settings()


def test_unset_or_empty_api_keys_mean_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "")
    assert Settings().api_keys == []
    monkeypatch.setenv("API_KEYS", " key-one , key-two ")
    keys = [key.get_secret_value() for key in Settings().api_keys]
    assert keys == ["key-one", "key-two"]


@pytest.mark.parametrize("value", [" ", ","])
def test_a_service_with_blank_api_keys_does_not_start(tmp_path: Path, value: str) -> None:
    done = start_and_exit(tmp_path, {"API_KEYS": value, "WEBHOOK_SECRET": "whsec_hidden-value"})
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "API_KEYS" in done.stderr
    assert "blank" in done.stderr or "no key" in done.stderr
    assert "Traceback" not in done.stderr
    assert "hidden-value" not in done.stderr + done.stdout


def test_a_data_dir_that_cannot_be_written_stops_the_service_saying_so(tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"  # root ignores permissions: a file where a folder goes
    in_the_way.write_text("")
    done = start_and_exit(tmp_path, {}, data_dir=in_the_way / "data")
    assert done.returncode == EXIT_DATA_DIR, done.stderr
    assert "DATA_DIR" in done.stderr
    assert "writable" in done.stderr
    assert "Traceback" not in done.stderr
