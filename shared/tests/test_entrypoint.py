"""The images' entrypoint (shared/docker/entrypoint.sh), run here without Docker against
temporary folders: started as root it takes the folders the service writes (a RunPod network
volume is owned by root) and drops to the service user; started as that user on a folder it
cannot write, it stops and says what is wrong and what to do.

The root cases need root (this machine, or passwordless sudo as on GitHub's runners); the
"other user" cases run the entrypoint as uid 10001 with setpriv (util-linux)."""

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "shared" / "docker" / "entrypoint.sh"
APP_UID = 10001
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"


def _sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.fail("these tests run commands as root: run them as root or with passwordless sudo")
    return ["sudo", "-n"]


def as_root(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command run as root, with these environment variables (and PATH) only."""
    variables = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})}
    return subprocess.run(
        [*_sudo(), "env", "-i", *(f"{k}={v}" for k, v in variables.items()), *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def as_uid(uid: int, *cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A command run as `uid` (no supplementary groups), as `docker run --user` would."""
    return as_root(
        SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *cmd, env=env
    )


def owners(folder: Path) -> set[int]:
    """The owner uid of `folder` and of everything under it (read as root: any mode)."""
    out = as_root("find", str(folder), "-printf", "%U\\n")
    assert out.returncode == 0, out.stderr
    return {int(line) for line in out.stdout.split()}


@pytest.fixture
def volume() -> Iterator[Path]:
    """A root-owned folder like a fresh RunPod network volume, in a world-readable place
    (pytest's own tmp_path is mode 0700: another user could not even reach it). The
    entrypoint is copied in, so that uid 10001 can read it wherever the checkout is."""
    base = Path(tempfile.mkdtemp(prefix="entrypoint-test-", dir="/tmp"))
    base.chmod(0o755)
    shutil.copy(ENTRYPOINT, base / "entrypoint.sh")
    (base / "entrypoint.sh").chmod(0o755)
    vol = base / "runpod-volume"
    assert as_root("mkdir", "-p", str(vol / "data" / "jobs")).returncode == 0
    assert as_root("sh", "-c", f"echo old > {vol}/data/jobs/old.json").returncode == 0
    assert as_root("chown", "-R", "0:0", str(base)).returncode == 0
    assert as_root("chmod", "-R", "go-w,a+rX", str(base)).returncode == 0
    yield vol
    as_root("rm", "-rf", str(base))


def service_env(vol: Path) -> dict[str, str]:
    return {
        "DATA_DIR": str(vol / "data"),
        "MODELS_DIR": str(vol / "models"),  # missing: made by the entrypoint
        "HF_HOME": str(vol / "hf"),
        "HOME": "/nonexistent",
    }


# The "service": says who it runs as, and writes where the real one writes.
SERVICE = (
    'id -u > "$DATA_DIR/whoami" && id -g >> "$DATA_DIR/whoami" '
    '&& echo "$HOME" >> "$DATA_DIR/whoami" '
    '&& : > "$MODELS_DIR/model.safetensors" && : > "$HF_HOME/token" && echo ran'
)


def entrypoint(vol: Path) -> str:
    return str(vol.parent / "entrypoint.sh")


def test_as_root_it_takes_the_folders_and_runs_the_service_as_uid_10001(volume: Path) -> None:
    result = as_root(entrypoint(volume), "sh", "-c", SERVICE, env=service_env(volume))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran"
    assert f"giving {volume / 'data'} to uid {APP_UID}" in result.stderr
    whoami = as_root("cat", str(volume / "data" / "whoami")).stdout.split()
    assert whoami[:2] == [str(APP_UID), str(APP_UID)]
    for folder in ("data", "models", "hf"):  # the old job file included
        assert owners(volume / folder) == {APP_UID}, folder
    # only the folders the service writes change hands, not the volume's root
    assert owners(volume.parent) - {APP_UID} == {0}
    assert os.stat(volume).st_uid == 0

    again = as_root(entrypoint(volume), "sh", "-c", "echo ran", env=service_env(volume))
    assert again.returncode == 0, again.stderr
    assert "giving" not in again.stderr  # nothing left to take: no chown on later starts


def test_as_uid_10001_on_a_root_owned_volume_it_says_what_to_do(volume: Path) -> None:
    result = as_uid(APP_UID, entrypoint(volume), "sh", "-c", SERVICE, env=service_env(volume))
    assert result.returncode == 78
    assert result.stdout == ""  # the service never started
    message = result.stderr
    assert f"cannot write to {volume / 'data'}" in message
    assert "owned by uid 0" in message
    assert f"runs as uid {APP_UID}" in message
    assert f"chown -R {APP_UID}:{APP_UID}" in message
    assert "run the container as root" in message
    assert owners(volume / "data") == {0}  # nothing changed


def test_as_uid_10001_a_missing_folder_it_cannot_create_is_named(volume: Path) -> None:
    env = {**service_env(volume), "DATA_DIR": str(volume / "data" / "jobs")}
    result = as_uid(APP_UID, entrypoint(volume), "true", env=env)
    assert result.returncode == 78
    assert f"cannot write to {volume / 'data' / 'jobs'}" in result.stderr


def test_as_uid_10001_on_its_own_volume_it_runs_as_itself(volume: Path) -> None:
    assert as_root("chown", "-R", f"{APP_UID}:{APP_UID}", str(volume)).returncode == 0
    result = as_uid(APP_UID, entrypoint(volume), "sh", "-c", SERVICE, env=service_env(volume))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran"
    assert result.stderr == ""
    whoami = as_root("cat", str(volume / "data" / "whoami")).stdout.split()
    assert whoami[:2] == [str(APP_UID), str(APP_UID)]


def test_as_root_with_fix_ownership_off_it_only_checks(volume: Path) -> None:
    env = {**service_env(volume), "FIX_OWNERSHIP": "0"}
    result = as_root(entrypoint(volume), "true", env=env)
    assert result.returncode == 78
    assert "FIX_OWNERSHIP=0" in result.stderr
    assert owners(volume / "data") == {0}


def test_run_as_root_keeps_root(volume: Path) -> None:
    env = {**service_env(volume), "RUN_AS_ROOT": "1"}
    result = as_root(entrypoint(volume), "id", "-u", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_no_command_is_an_error(volume: Path) -> None:
    result = as_root(entrypoint(volume), env=service_env(volume))
    assert result.returncode == 64
    assert "no command" in result.stderr


def test_only_the_named_settings_are_taken(volume: Path) -> None:
    """Qwen's image: WRITABLE_SETTINGS=DATA_DIR (it never downloads; /models may be read-only)."""
    assert as_root("mkdir", "-p", str(volume / "models")).returncode == 0
    env = {**service_env(volume), "WRITABLE_SETTINGS": "DATA_DIR"}
    result = as_root(entrypoint(volume), "id", "-u", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(APP_UID)
    assert owners(volume / "data") == {APP_UID}
    assert owners(volume / "models") == {0}
    assert not (volume / "hf").exists()
