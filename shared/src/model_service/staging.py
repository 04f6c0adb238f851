"""A request's input files, written under a name of its own and moved into the job's
`inputs` folder only once the request has won the job id (its job was stored).

Two requests for one id (a client retrying a slow `PUT`) each fetch and write their own
files; the one that loses (409, a repeat, or any error) removes only its own staging
folder and never touches the winner's files.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from model_service.settings import Settings

# DATA_DIR/staging: on the same disk as the jobs, so a move is a rename; emptied at start
STAGING = "staging"


class InputStaging:
    def __init__(self, settings: Settings, job_id: str) -> None:
        self.final = settings.job_dir(job_id) / "inputs"  # where the job will find them
        self.dir = settings.data_dir / STAGING / f"{job_id}.{secrets.token_hex(6)}"

    def path(self, name: str) -> Path:
        """Where this request writes the input file `name`."""
        return self.dir / name

    def final_path(self, written: Path) -> str:
        """The path the stored job gives a file written at `written`."""
        return str((self.final / written.relative_to(self.dir)).resolve())

    def commit(self) -> None:
        """This request won the id: its files become the job's."""
        if not self.dir.exists():
            return  # no file inputs
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.final.exists():  # left by a request that died after storing nothing
            shutil.rmtree(self.final)
        self.dir.replace(self.final)

    def discard(self) -> None:
        """Removes what is left of this request's own files (nothing after `commit`)."""
        if self.dir.exists():  # most jobs bring no file: no folder was made
            shutil.rmtree(self.dir, ignore_errors=True)
