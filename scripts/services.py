#!/usr/bin/env python3
"""The service folders, and everything derived from them: the one list of services.

A service folder is a top-level folder with an `image.toml` (how its image is built and run;
README, "Adding a service"). Everything that lists services reads them from here, or globs
the same folders:

  scripts/services.py list                    the service names, one a line
  scripts/services.py packages                the folders with a Python package (pyproject)
  scripts/services.py matrix [--baked 0|1]    the images workflow's build matrix (JSON)
  scripts/services.py build-args <service>    its build arguments, KEY=VALUE a line
  scripts/services.py show <service> <key>    one of dockerfile, port, baked (1/0), comfyui (1/0)
  scripts/services.py build-command <service> [--tool docker|buildah]   the build command
  scripts/services.py compose                 docker-compose.yml (generated: write it with
                                              `scripts/services.py compose > docker-compose.yml`)

image.toml keys (all optional):
  dockerfile     default shared/docker/comfyui.Dockerfile (the one ComfyUI Dockerfile)
  package        the folder of the service's Python package (default: the service's own)
  port           the API port in the container (default 8189)
  host_port      the port docker-compose.yml publishes it on (default: port)
  models_mount   where compose mounts the shared `models` volume (MODELS_DIR); "" for none
                 (default /runpod-volume/models; none when BAKE_WEIGHTS is 1)
  release_only   build only for v* tags and manual runs (default: BAKE_WEIGHTS is 1)
  [build_args]   more build arguments (SERVICE=<folder> is always given)
Python 3.11+ and the standard library only: CI runs it before any setup.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DOCKERFILE = "shared/docker/comfyui.Dockerfile"
DEFAULT_MODELS_MOUNT = "/runpod-volume/models"


@dataclass(frozen=True)
class Service:
    name: str
    dockerfile: str
    package: str | None
    port: int
    host_port: int
    models_mount: str
    release_only: bool
    build_args: dict[str, str] = field(default_factory=dict)

    @property
    def baked(self) -> bool:
        return self.build_args.get("BAKE_WEIGHTS") == "1"

    def all_build_args(self) -> dict[str, str]:
        """What the build gets: SERVICE for the shared Dockerfile, then image.toml's."""
        base = {"SERVICE": self.name} if self.dockerfile == COMFYUI_DOCKERFILE else {}
        return {**base, **self.build_args}

    def inputs(self) -> list[str]:
        """The paths whose change means the image must be built again."""
        paths = [f"{self.name}/", "shared/src/", "shared/pyproject.toml", ".dockerignore"]
        if self.package and self.package != self.name:
            paths.append(f"{self.package}/")
        if self.dockerfile.startswith("shared/"):
            paths.append(str(Path(self.dockerfile).parent) + "/")
        else:
            paths.append("shared/docker/")  # the entrypoint
        return paths


def load(root: Path = ROOT) -> list[Service]:
    services = []
    for config_file in sorted(root.glob("*/image.toml")):
        folder = config_file.parent
        config = tomllib.loads(config_file.read_text())
        unknown = set(config) - {
            "dockerfile", "package", "port", "host_port", "models_mount", "release_only",
            "build_args",
        }  # fmt: skip
        if unknown:
            raise SystemExit(f"{config_file}: unknown keys {sorted(unknown)}")
        build_args = {str(k): str(v) for k, v in config.get("build_args", {}).items()}
        package = config.get("package") or build_args.get("PACKAGE_DIR")
        if package is None and (folder / "pyproject.toml").is_file():
            package = folder.name
        baked = build_args.get("BAKE_WEIGHTS") == "1"
        port = int(config.get("port", 8189))
        services.append(
            Service(
                name=folder.name,
                dockerfile=config.get("dockerfile", COMFYUI_DOCKERFILE),
                package=package,
                port=port,
                host_port=int(config.get("host_port", port)),
                models_mount=config.get("models_mount", "" if baked else DEFAULT_MODELS_MOUNT),
                release_only=bool(config.get("release_only", baked)),
                build_args=build_args,
            )
        )
    return services


def by_name(name: str) -> Service:
    for service in load():
        if service.name == name:
            return service
    raise SystemExit(f"unknown service {name!r}: no {name}/image.toml")


def packages() -> list[str]:
    """Folders with a service's Python package, in order (each once)."""
    return sorted({s.package for s in load() if s.package})


def matrix(release_only: bool | None) -> list[dict[str, str]]:
    return [
        {
            "service": s.name,
            "dockerfile": s.dockerfile,
            "build_args": "\n".join(f"{k}={v}" for k, v in s.all_build_args().items()),
            "inputs": " ".join(s.inputs()),
            # the GHA cache a release-only image reads: that of the service it packs
            "cache_scope": s.package if s.release_only and s.package else s.name,
        }
        for s in load()
        if release_only is None or s.release_only == release_only
    ]


def build_command(service: Service, tool: str) -> list[str]:
    cmd = [tool, "build"] if tool == "docker" else [tool, "bud"]
    cmd += ["-f", service.dockerfile, "-t", service.name]
    for key, value in service.all_build_args().items():
        cmd += ["--build-arg", f"{key}={value}"]
    return [*cmd, "."]


COMPOSE_HEAD = """\
# GENERATED by `scripts/services.py compose > docker-compose.yml` from the service folders'
# image.toml: do not edit by hand (shared/tests/test_deploy_files.py checks it is current).
#
# Every service on one GPU host (see README, "Deploy"):
#
#   docker compose pull                  # the images from GHCR (OWNER, TAG below), or
#   docker compose build                 # build them here (context: the repository root)
#   docker compose up -d <service> ...   # or all: up -d
#
# Only the API ports are published; each ComfyUI stays on the container's 127.0.0.1:8188.
# Weights: one named volume, `models`, shared by every service that downloads its weights
# (each file once, whichever service starts first), mounted at each image's MODELS_DIR.
# Services with the weights in the image (BAKE_WEIGHTS=1) mount none and are under the
# `packed` profile (`docker compose --profile packed up -d <service>`). Jobs and outputs:
# one volume per service at /data. The containers start as root and hand the volumes to
# uid 10001 before the service starts (README, "Volumes and the service user").
#
# Every service asks for one GPU (count: 1 is the host's first GPU): on a host with one GPU
# run one service at a time, or the ones whose models fit together; on a host with several,
# give each service its own with `device_ids: ["1"]` instead of `count: 1`.
# The health checks are the images' own (GET /health); GET /ready says when a job can run.

x-gpu: &gpu
  resources:
    reservations:
      devices:
        - driver: nvidia
          count: 1
          capabilities: [gpu]

services:
"""


def compose() -> str:
    out = [COMPOSE_HEAD]
    volumes = ["models"]
    for s in load():
        q = json.dumps  # YAML accepts JSON strings: values with spaces or colons stay whole
        lines = [f"  {s.name}:"]
        if s.baked:
            lines.append("    profiles: [packed]")
        lines += [
            f"    image: ghcr.io/${{OWNER:-yourname}}/{s.name}:${{TAG:-latest}}",
            "    build:",
            "      context: .",
            f"      dockerfile: {s.dockerfile}",
        ]
        if s.all_build_args():
            lines.append("      args:")
            lines += [f"        {k}: {q(v)}" for k, v in s.all_build_args().items()]
        lines += [
            "    restart: unless-stopped",
            "    ports:",
            f'      - "{s.host_port}:{s.port}"',
            "    environment:",
        ]
        if s.models_mount:
            lines.append(f"      MODELS_DIR: {s.models_mount}")
        lines += [
            "      API_KEYS: ${API_KEYS:-}",
            "      HF_TOKEN: ${HF_TOKEN:-}",
            "    volumes:",
        ]
        if s.models_mount:
            lines.append(f"      - models:{s.models_mount}")
        lines += [f"      - {s.name}-data:/data", "    deploy: *gpu", ""]
        out.append("\n".join(lines) + "\n")
        volumes.append(f"{s.name}-data")
    out.append("volumes:\n" + "".join(f"  {v}:\n" for v in volumes))
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    sub.add_parser("packages")
    m = sub.add_parser("matrix")
    m.add_argument("--release-only", choices=("0", "1"), default=None)
    a = sub.add_parser("build-args")
    a.add_argument("service")
    w = sub.add_parser("show")
    w.add_argument("service")
    w.add_argument("key", choices=("dockerfile", "port", "baked", "comfyui"))
    c = sub.add_parser("build-command")
    c.add_argument("service")
    c.add_argument("--tool", choices=("docker", "buildah"), default="docker")
    sub.add_parser("compose")
    args = parser.parse_args()
    if args.command == "list":
        print("\n".join(s.name for s in load()))
    elif args.command == "packages":
        print("\n".join(packages()))
    elif args.command == "matrix":
        only = None if args.release_only is None else args.release_only == "1"
        print(json.dumps(matrix(only)))
    elif args.command == "build-args":
        for key, value in by_name(args.service).all_build_args().items():
            print(f"{key}={value}")
    elif args.command == "show":
        service = by_name(args.service)
        print(
            {
                "dockerfile": service.dockerfile,
                "port": service.port,
                "baked": int(service.baked),
                "comfyui": int(service.dockerfile == COMFYUI_DOCKERFILE),
            }[args.key]
        )
    elif args.command == "build-command":
        print(shlex.join(build_command(by_name(args.service), args.tool)))
    elif args.command == "compose":
        sys.stdout.write(compose())


if __name__ == "__main__":
    main()
