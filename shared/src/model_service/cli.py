"""`model-service serve <service-folder>`: run one service in the foreground."""

import argparse
from importlib.metadata import entry_points

import uvicorn

from model_service.logs import configure_logging
from model_service.service import ServiceSpec
from model_service.settings import Settings

ENTRY_POINT_GROUP = "model_service.services"


def load_spec(name: str) -> ServiceSpec:
    """A service by its folder name, from the installed services' entry points."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        raise SystemExit(f"unknown service {name!r}; installed: {', '.join(sorted(found))}")
    spec: ServiceSpec = found[name].load()
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(prog="model-service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a service's HTTP API and worker")
    serve.add_argument("service", help="service folder name, e.g. qwen-image-edit-nunchaku")
    args = parser.parse_args()
    if args.command == "serve":
        settings = Settings()
        configure_logging(settings.log_level, settings.log_format)
        spec = load_spec(args.service)
        from model_service.api.app import create_app

        app = create_app(spec, settings)
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port or spec.default_port,
            log_config=None,
            timeout_graceful_shutdown=10,
        )


if __name__ == "__main__":
    main()
