"""`python -m model_service_testing.comfy_standin`: the stand-in ComfyUI server."""

from model_service_testing.comfy_standin.server import main

main()
