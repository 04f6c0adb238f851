"""Workflows with bindings: building a job's graph, and checking it against /object_info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model_service.comfy.engine import output_nodes
from model_service.comfy.workflow import Bind, Workflow

GRAPH: dict[str, Any] = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "model.safetensors"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "3": {
        "class_type": "Sampler",
        "inputs": {"model": ["1", 0], "image": ["2", 0], "seed": 0, "steps": 20},
    },
    "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "out/v"}},
}
OBJECT_INFO: dict[str, Any] = {
    "UNETLoader": {
        "input": {"required": {"unet_name": [["model.safetensors", "other.safetensors"]]}}
    },
    "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}}},
    "Sampler": {
        "input": {
            "required": {"model": ["MODEL"], "seed": ["INT", {}], "steps": ["INT", {}]},
            "optional": {"image": ["IMAGE"]},
        }
    },
    "SaveVideo": {"input": {"required": {"video": ["VIDEO"], "filename_prefix": ["STRING", {}]}}},
}


def _workflow(tmp_path: Path, **kwargs: Any) -> Workflow:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(GRAPH))
    defaults: dict[str, Any] = {
        "bind": {
            "seed": "3.seed",
            "steps": Bind("3.steps", convert=int),
            "image": Bind("2.image", media="image"),
        },
        "only_when": {"2": "image"},
        "outputs": {"4": "video"},
    }
    return Workflow.load(path, **{**defaults, **kwargs})


def test_build_binds_values_and_keeps_the_template(tmp_path: Path) -> None:
    workflow = _workflow(tmp_path)
    graph = workflow.build({"seed": 5, "steps": "4", "image": "jobs/a.png"}, tag="job9")
    assert graph["3"]["inputs"]["seed"] == 5
    assert graph["3"]["inputs"]["steps"] == 4
    assert graph["2"]["inputs"]["image"] == "jobs/a.png"
    assert graph["4"]["inputs"]["filename_prefix"] == "out/v_job9"
    assert workflow.graph["3"]["inputs"]["seed"] == 0
    assert workflow.graph["4"]["inputs"]["filename_prefix"] == "out/v"
    assert workflow.media_fields == {"image": "image"}


def test_build_drops_optional_nodes_and_their_links(tmp_path: Path) -> None:
    graph = _workflow(tmp_path).build({"seed": 1, "steps": None, "image": None}, tag="t")
    assert "2" not in graph
    assert "image" not in graph["3"]["inputs"]
    assert graph["3"]["inputs"]["steps"] == 20  # absent value: the graph's own


def test_check_passes_on_a_complete_comfyui(tmp_path: Path) -> None:
    assert _workflow(tmp_path).check(OBJECT_INFO) == []


def test_check_names_a_missing_model_file_and_where_it_comes_from(tmp_path: Path) -> None:
    info = json.loads(json.dumps(OBJECT_INFO))
    info["UNETLoader"]["input"]["required"]["unet_name"] = [["other.safetensors"]]
    problems = _workflow(tmp_path).check(info, lambda folder, name: f"get it from hf://{name}")
    assert problems == [
        "model file diffusion_models/model.safetensors is missing (workflow 'wf' node 1, "
        "UNETLoader.unet_name); get it from hf://model.safetensors"
    ]


def test_check_names_a_missing_node_class_and_input(tmp_path: Path) -> None:
    info = {k: v for k, v in OBJECT_INFO.items() if k != "SaveVideo"}
    info["Sampler"] = {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {}]}}}
    problems = _workflow(tmp_path).check(info)
    assert "Sampler has no input 'steps' (workflow 'wf' node 3)" in problems
    assert any("no node class 'SaveVideo'" in p and "node 4" in p for p in problems)


def test_new_style_combo_options_are_read(tmp_path: Path) -> None:
    info = json.loads(json.dumps(OBJECT_INFO))
    info["UNETLoader"]["input"]["required"]["unet_name"] = [
        "COMBO",
        {"options": ["model.safetensors"]},
    ]
    assert _workflow(tmp_path).check(info) == []


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"bind": {"seed": "9.seed"}}, "bound to node 9"),
        ({"only_when": {"8": "image"}}, "node 8"),
        ({"outputs": {"7": "video"}}, "node 7"),
    ],
)
def test_load_refuses_bindings_to_nodes_not_in_the_graph(
    tmp_path: Path, kwargs: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        _workflow(tmp_path, **kwargs)


def test_a_binding_target_must_name_node_and_input() -> None:
    with pytest.raises(ValueError, match="not '<node id>.<input>'"):
        Bind("3")


# --- where an output is taken from ----------------------------------------------------


def test_local_output_is_taken_only_from_inside_comfyuis_output_folder(tmp_path: Path) -> None:
    from model_service.comfy.client import OutputFile
    from model_service.comfy.engine import _local_output

    root = tmp_path / "output"
    (root / "jobs").mkdir(parents=True)
    (root / "jobs" / "clip.mp4").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")

    def output(filename: str, subfolder: str = "jobs", kind: str = "output") -> OutputFile:
        return OutputFile("9", "images", filename, subfolder, kind)

    assert _local_output(root, output("clip.mp4")) == (root / "jobs" / "clip.mp4").resolve()
    assert _local_output(None, output("clip.mp4")) is None  # ComfyUI is not ours
    assert _local_output(root, output("clip.mp4", kind="temp")) is None
    assert _local_output(root, output("missing.mp4")) is None  # then fetched over /view
    assert _local_output(root, output("secret.txt", subfolder="..")) is None
    assert _local_output(root, output("../../secret.txt")) is None


def test_a_custom_graphs_output_nodes_come_from_object_info() -> None:
    """The nodes whose files the engine expects on the websocket (so `/history` is not
    read for a custom workflow): those whose class is an output node, nothing else."""
    info = {
        "EmptyImage": {"output_node": False},
        "ImageInvert": {},
        "SaveImage": {"output_node": True},
        "PreviewImage": {"output_node": True},
    }
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "5": {"class_type": "NotInstalled", "inputs": {}},
    }
    assert output_nodes(graph, info) == ["3", "4"]
    assert output_nodes(graph, {}) == []
