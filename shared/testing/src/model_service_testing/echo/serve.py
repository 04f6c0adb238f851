"""Run the echo service with uvicorn: `python -m model_service_testing.echo.serve` (env configures;
MODE=serverless runs it as a RunPod worker)."""

import os

import uvicorn

from model_service.api.app import create_app
from model_service.logs import configure_logging
from model_service.service import ServiceSpec
from model_service.startup import load_settings
from model_service_testing.echo.spec import SPEC

if __name__ == "__main__":
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    options = {
        "fail_setup": os.environ.get("ECHO_FAIL_SETUP") == "1",
        "setup_s": os.environ.get("ECHO_SETUP_S", "0"),
    }
    spec = ServiceSpec(**{**SPEC.__dict__, "worker_options": lambda _settings: options})
    if settings.mode == "serverless":  # a RunPod worker, as `model-service serve` starts it
        from model_service import serverless

        serverless.serve(spec, settings)
    else:
        uvicorn.run(
            create_app(spec, settings),
            host="127.0.0.1",
            port=settings.port or 8099,
            log_config=None,
        )
