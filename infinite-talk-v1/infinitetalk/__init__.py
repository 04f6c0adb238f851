"""InfiniteTalk: a talking video from one image and speech, on an embedded ComfyUI."""
