"""The stand-in's node schema is the pinned ComfyUI's own (v0.33.0 release), vendored in
the testing package: every service workflow's nodes are in it, later ComfyUI's are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_service_testing.comfy_standin import OBJECT_INFO, load_object_info
from model_service_testing.comfy_standin.snapshot import write_object_info

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(REPO.glob("*/*/workflows/*.json"))


@pytest.fixture(scope="module")
def nodes() -> dict[str, dict[str, object]]:
    return load_object_info(OBJECT_INFO)


def test_the_snapshot_lives_in_the_repository() -> None:
    assert OBJECT_INFO.is_relative_to(REPO)
    assert OBJECT_INFO.is_file()


def test_the_snapshot_is_the_release_not_a_later_checkout(nodes: dict[str, dict]) -> None:
    assert len(nodes) == 849  # v0.33.0 with its example custom node; a later master has 887
    assert "SaveImageWebsocket" in nodes  # custom_nodes/websocket_image_save.py
    for later in ("Trellis2Conditioning", "ImageCropToMask", "FluxVideoUpscaleNode"):
        assert later not in nodes
    # 0.33.0's SaveVideo: `format` is a plain combo and `codec` a required input of its own
    save = nodes["SaveVideo"]["input"]["required"]
    assert save["format"][0] == "COMBO"
    assert "codec" in save
    assert len(nodes["GetVideoComponents"]["output"]) == 4  # later: a `color_space` too


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_every_service_workflow_uses_only_nodes_of_the_pinned_comfyui(
    workflow: Path, nodes: dict[str, dict]
) -> None:
    graph = json.loads(workflow.read_text())
    used = {node["class_type"] for node in graph.values()}
    assert used - set(nodes) == set()


def test_workflows_are_found() -> None:
    assert len(WORKFLOWS) >= 5, WORKFLOWS


def test_write_is_reproducible_and_round_trips(tmp_path: Path, nodes: dict[str, dict]) -> None:
    first, second = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    write_object_info(nodes, first)
    write_object_info(nodes, second)
    assert first.read_bytes() == second.read_bytes()
    assert load_object_info(first) == nodes
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"X": {"input": {}}}))
    assert load_object_info(plain) == {"X": {"input": {}}}
