"""A tiny ComfyUI custom node, test data for the image smoke test (scripts/image_smoke.sh):
the image is built with it (CUSTOM_NODES=./scripts/smoke_custom_node/smoke_invert) and runs
../workflow.json, which uses it. One node class: an image's colours inverted."""


class SmokeInvert:
    """1 - image, on ComfyUI's IMAGE tensors (batch, height, width, channels in 0..1)."""

    CATEGORY = "image/smoke test"
    FUNCTION = "invert"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):  # ComfyUI's name
        return {"required": {"image": ("IMAGE",)}}

    def invert(self, image):
        return (1.0 - image,)


NODE_CLASS_MAPPINGS = {"SmokeInvert": SmokeInvert}
NODE_DISPLAY_NAME_MAPPINGS = {"SmokeInvert": "Invert (smoke test)"}
