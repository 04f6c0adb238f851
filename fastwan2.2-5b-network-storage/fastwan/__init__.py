"""FastWan2.2-TI2V-5B on an embedded ComfyUI: text-to-video and image-to-video."""
