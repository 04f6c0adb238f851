"""shared/docker/comfy-node-install.sh (how the ComfyUI image installs CUSTOM_NODES), run
here without Docker: a ComfyUI folder and a stand-in venv whose `python` records what pip
was asked to install (with the torch constraint), against a folder node and a local git
repository at a pinned tag. The Comfy Registry path (comfy-cli) needs the registry: CI's
image builds only."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "shared" / "docker" / "comfy-node-install.sh"
SMOKE_NODE = "./scripts/smoke_custom_node/smoke_invert"

FAKE_PYTHON = """#!/bin/sh
# pip's stand-in: records each call; `install.py` runs for real (it writes a marker)
echo "$*" >> "$(dirname "$0")/../calls"
[ "$1" = install.py ] && : > installed-by-install-py
exit 0
"""


def setup(tmp_path: Path) -> dict[str, str]:
    comfy = tmp_path / "comfyui"
    (comfy / "custom_nodes").mkdir(parents=True)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    (venv / "constraints.txt").write_text("torch==2.9.1+cu128\n")
    return {
        "PATH": "/usr/bin:/bin",
        "COMFYUI_DIR": str(comfy),
        "COMFYUI_VENV": str(venv),
        "CONTEXT_DIR": str(ROOT),
        "HOME": str(tmp_path),
    }


def run(env: dict[str, str], *nodes: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALLER), *nodes], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        check=True,
        capture_output=True,
    )


def test_a_folder_and_a_git_repo_at_a_tag(tmp_path: Path) -> None:
    env = setup(tmp_path)
    repo = tmp_path / "ComfyUI-Thing"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (repo / "requirements.txt").write_text("six==1.17.0\n")
    (repo / "install.py").write_text("open('installed-by-install-py', 'w').close()\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    git(repo, "tag", "v1.0")
    (repo / "__init__.py").write_text("raise RuntimeError('not the pinned version')\n")
    git(repo, "commit", "-qam", "later")

    result = run(env, SMOKE_NODE, f"file://{repo}@v1.0")
    assert result.returncode == 0, result.stderr
    nodes = Path(env["COMFYUI_DIR"]) / "custom_nodes"
    assert sorted(p.name for p in nodes.iterdir()) == ["ComfyUI-Thing", "smoke_invert"]
    assert "class SmokeInvert" in (nodes / "smoke_invert" / "__init__.py").read_text()
    thing = nodes / "ComfyUI-Thing"
    assert (thing / "__init__.py").read_text() == "NODE_CLASS_MAPPINGS = {}\n"  # the tag's
    assert not (thing / ".git").exists()
    assert (thing / "installed-by-install-py").exists()
    calls = (tmp_path / "venv" / "calls").read_text().splitlines()
    constraint = f"-c {tmp_path / 'venv' / 'constraints.txt'}"
    assert calls == [
        f"-m pip install --no-cache-dir {constraint} -r {thing / 'requirements.txt'}",
        "install.py",
        "-m pip check",
    ]


def test_a_git_url_needs_a_pinned_ref(tmp_path: Path) -> None:
    result = run(setup(tmp_path), "https://github.com/someone/ComfyUI-Thing")
    assert result.returncode == 1
    assert "give the ref to install, <git URL>@<tag or commit>" in result.stderr


def test_a_missing_folder_or_ref_is_named(tmp_path: Path) -> None:
    env = setup(tmp_path)
    result = run(env, "./no/such/node")
    assert result.returncode == 1
    assert "./no/such/node: no such folder" in result.stderr
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "x")
    result = run(env, f"file://{repo}@v9")
    assert result.returncode == 1
    assert "no ref v9" in result.stderr
