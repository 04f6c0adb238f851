"""Start-up checks that end the process with a clear message and exit code, never a
traceback: settings that do not validate, a DATA_DIR that cannot be written."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from model_service.settings import Settings
from model_service.staging import STAGING

EXIT_CONFIG = 78  # sysexits' EX_CONFIG: a setting is wrong
EXIT_DATA_DIR = 73  # sysexits' EX_CANTCREAT: DATA_DIR cannot be written


def load_settings() -> Settings:
    """The settings, or exit (EXIT_CONFIG) naming each wrong variable. The values are
    not echoed: one of them may be a secret."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        ]
        fail(EXIT_CONFIG, "invalid settings (environment variables):\n" + "\n".join(lines))


def prepare_data_dir(data_dir: Path) -> None:
    """DATA_DIR created and writable, or exit (EXIT_DATA_DIR) saying what to do; the
    input files of requests that died mid-way removed."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".write-check-"):
            pass
        shutil.rmtree(data_dir / STAGING, ignore_errors=True)
    except OSError as exc:
        fail(
            EXIT_DATA_DIR,
            f"DATA_DIR {str(data_dir)!r} cannot be written ({exc.strerror or exc}); the job "
            "store, inputs and outputs live there: mount a writable volume or set DATA_DIR "
            f"to a writable folder (this process runs as uid {os.getuid()})",
        )


def fail(code: int, message: str) -> NoReturn:
    print(f"model-service: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
