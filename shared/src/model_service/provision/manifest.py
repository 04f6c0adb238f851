"""Which weight files a service needs, where they come from and where they land.

A manifest is a small JSON file (one per service), for example::

    {
      "service": "wan22-a14b",
      "files": [
        {
          "name": "wan_2.1_vae.safetensors",
          "folder": "vae",
          "hub": {
            "repo_id": "Comfy-Org/Wan_2.2_ComfyUI_Repackaged",
            "path": "split_files/vae/wan_2.1_vae.safetensors",
            "revision": "main"
          },
          "size_bytes": 253815318,
          "sha256": null,
          "tiny": "wan21_vae"
        },
        {
          "name": "lora.safetensors",
          "folder": "loras",
          "url": "https://example.com/lora.safetensors",
          "size_bytes": 1234,
          "sha256": "..."
        }
      ]
    }

Each file lands at `MODELS_DIR/<folder>/<name>`, `folder` being one of ComfyUI's model
folders (`diffusion_models`, `text_encoders`, `vae`, `loras`, `audio_encoders`,
`model_patches`, ...; a sub-folder such as `loras/wan22` is allowed). The exact size is
required: it is how a present file is recognised without reading it, and what the
disk-space check adds up. `tiny` (optional) names the tiny random-weight stand-in that
PROFILE=tiny generates under the same name (see `model_service.comfy.tiny_weights`).
Only `.safetensors` files: no pickles (`.ckpt`, `.pt`, `.bin`) that could run code when
loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

SUFFIX = ".safetensors"
STAGING_DIR = ".staging"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face Hub model repository."""

    repo_id: str
    path: str
    revision: str = "main"

    def __post_init__(self) -> None:
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"hub repo_id must be 'owner/name', got {self.repo_id!r}")
        if not self.path.endswith(SUFFIX):
            raise ValueError(f"hub path {self.path!r} is not a {SUFFIX} file")
        if not self.revision:
            raise ValueError("hub revision must not be empty (use 'main' or a commit hash)")

    def describe(self) -> str:
        return f"hf://{self.repo_id}/{self.path}@{self.revision}"


@dataclass(frozen=True)
class UrlSource:
    """A file at a plain HTTP(S) URL (served with `Range` support, ideally)."""

    url: str

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be an http(s) URL, got {self.url!r}")

    def describe(self) -> str:
        return self.url


Source = HubSource | UrlSource


def _check_relative(value: str, what: str) -> None:
    path = PurePosixPath(value)
    if (
        not value
        or "\\" in value
        or path.is_absolute()
        or any(part in ("", ".", "..") or part.startswith(".") for part in value.split("/"))
    ):
        raise ValueError(f"{what} {value!r} must be a plain relative name (no '..', no dot-names)")


@dataclass(frozen=True)
class ModelFile:
    """One weight file: lands at `models_dir / folder / name`."""

    name: str
    folder: str
    source: Source
    size_bytes: int
    sha256: str | None = None
    tiny: str | None = None  # the tiny stand-in's kind for PROFILE=tiny (comfy/tiny_weights)

    def __post_init__(self) -> None:
        _check_relative(self.folder, "folder")
        _check_relative(self.name, "name")
        if "/" in self.name:
            raise ValueError(f"name {self.name!r} must not contain '/'; put sub-folders in folder")
        if not self.name.endswith(SUFFIX):
            raise ValueError(
                f"{self.name!r}: only {SUFFIX} files are allowed (pickled formats can run code)"
            )
        if isinstance(self.size_bytes, bool) or self.size_bytes <= 0:
            raise ValueError(f"{self.name}: size_bytes must be a positive integer")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lower-case hex digits")

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"

    def path(self, models_dir: Path) -> Path:
        return models_dir / self.folder / self.name

    def is_present(self, models_dir: Path) -> bool:
        """The file is there with the right size (contents are not read)."""
        try:
            return self.path(models_dir).stat().st_size == self.size_bytes
        except OSError:
            return False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "folder": self.folder}
        if isinstance(self.source, HubSource):
            data["hub"] = {
                "repo_id": self.source.repo_id,
                "path": self.source.path,
                "revision": self.source.revision,
            }
        else:
            data["url"] = self.source.url
        data["size_bytes"] = self.size_bytes
        data["sha256"] = self.sha256
        if self.tiny is not None:
            data["tiny"] = self.tiny
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFile:
        known = {"name", "folder", "hub", "url", "size_bytes", "sha256", "tiny"}
        if unknown := set(data) - known:
            raise ValueError(f"unknown keys in a manifest file entry: {sorted(unknown)}")
        if ("hub" in data) == ("url" in data):
            raise ValueError(f"{data.get('name')!r}: give exactly one of 'hub' or 'url'")
        source: Source
        if "hub" in data:
            hub = data["hub"]
            if not isinstance(hub, dict):
                raise ValueError(f"{data.get('name')!r}: 'hub' must be an object")
            source = HubSource(
                repo_id=str(hub["repo_id"]),
                path=str(hub["path"]),
                revision=str(hub.get("revision", "main")),
            )
        else:
            source = UrlSource(str(data["url"]))
        size = data["size_bytes"]
        if not isinstance(size, int):
            raise ValueError(f"{data.get('name')!r}: size_bytes must be an integer")
        sha = data.get("sha256")
        return cls(
            name=str(data["name"]),
            folder=str(data["folder"]),
            source=source,
            size_bytes=size,
            sha256=None if sha is None else str(sha),
            tiny=None if data.get("tiny") is None else str(data["tiny"]),
        )


@dataclass(frozen=True)
class Manifest:
    """The weight files of one service."""

    service: str
    files: tuple[ModelFile, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(self.files))
        seen: set[str] = set()
        for file in self.files:
            if file.relpath in seen:
                raise ValueError(f"{file.relpath} appears twice in the manifest")
            seen.add(file.relpath)

    @property
    def total_bytes(self) -> int:
        return sum(file.size_bytes for file in self.files)

    def missing(self, models_dir: Path) -> list[ModelFile]:
        """Files that are absent or have the wrong size."""
        return [file for file in self.files if not file.is_present(models_dir)]

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "files": [file.to_dict() for file in self.files]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            raise ValueError("a manifest is an object with 'service' and a 'files' list")
        return cls(
            service=str(data.get("service", "")),
            files=tuple(ModelFile.from_dict(item) for item in data["files"]),
        )

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a JSON manifest; `ValueError` names the file when it is malformed."""
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"invalid manifest {path}: {detail}") from exc

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
