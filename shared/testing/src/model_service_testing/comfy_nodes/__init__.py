"""ComfyUI custom-node folders for tests on a real ComfyUI (`sigma_probe` puts this folder
on ComfyUI's `custom_nodes` search path). Each sub-package is loaded by ComfyUI, not by us."""
