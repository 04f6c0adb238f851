"""Wan2.2-14B (A14B, two experts) with per-request LoRAs on an embedded ComfyUI."""
