"""Test helpers of the model services, never installed in an image: real service
processes, the stand-in ComfyUI, a stand-in Hugging Face Hub, the echo service, and the
pytest plugin (`pytest_plugin`) with the shared fixtures."""
