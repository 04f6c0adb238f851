"""`model-service serve <service-folder>`: run one service in the foreground.

`model-service download --manifest <file.json>`: put a manifest's model files under
MODELS_DIR (or `--models-dir`); exits non-zero with the reason when a file fails.
"""

import argparse
import asyncio
from importlib.metadata import entry_points
from pathlib import Path

import uvicorn

from model_service.logs import configure_logging
from model_service.service import ServiceSpec
from model_service.startup import load_settings

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
    serve = sub.add_parser(
        "serve", help="run a service: its HTTP API, or a RunPod serverless worker (MODE)"
    )
    serve.add_argument("service", help="service folder name, e.g. qwen-image-edit-nunchaku")
    download = sub.add_parser("download", help="download a manifest's model files")
    download.add_argument("--manifest", required=True, type=Path, help="manifest JSON file")
    download.add_argument(
        "--models-dir", type=Path, default=None, help="default: MODELS_DIR from the environment"
    )
    download.add_argument("--parallel", type=int, default=3, help="files at once (default 3)")
    # with MODE=serverless the runpod SDK reads its own flags (--rp_serve_api, ...)
    args, sdk_flags = parser.parse_known_args()
    settings = load_settings() if args.command == "serve" else None
    if sdk_flags and (settings is None or settings.mode != "serverless"):
        parser.error(f"unrecognized arguments: {' '.join(sdk_flags)}")
    if args.command == "download":
        run_download(args.manifest, args.models_dir, args.parallel)
    elif settings is not None:
        configure_logging(settings.log_level, settings.log_format, settings.secret_values())
        spec = load_spec(args.service)
        if settings.mode == "serverless":
            from model_service import serverless

            serverless.serve(spec, settings)
            return
        from model_service.api.app import create_app

        app = create_app(spec, settings)
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port or spec.default_port,
            log_config=None,
            loop="uvloop",
            http="httptools",
            timeout_graceful_shutdown=10,
        )


def run_download(manifest_path: Path, models_dir: Path | None, parallel: int) -> None:
    """The `download` command: exits with status 1 and the reason on failure."""
    from huggingface_hub import get_token

    from model_service.provision import Manifest, ProvisionError, provision

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    if parallel < 1:
        raise SystemExit("--parallel must be at least 1")
    try:
        manifest = Manifest.load(manifest_path)
    except OSError as exc:
        raise SystemExit(f"cannot read manifest {manifest_path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    target = models_dir if models_dir is not None else settings.models_dir
    try:
        report = asyncio.run(
            provision(
                manifest,
                target,
                parallel=parallel,
                hf_token=get_token(),
                hf_endpoint=settings.hf_endpoint,
                civitai_token=(
                    settings.civitai_token.get_secret_value() if settings.civitai_token else None
                ),
            )
        )
    except ProvisionError as exc:
        raise SystemExit(f"model download failed: {exc.message}") from exc
    print(
        f"{manifest.service}: {len(manifest.files)} files in {target} "
        f"({len(report.downloaded)} downloaded, {report.bytes_downloaded / 1e9:.2f} GB)"
    )


if __name__ == "__main__":
    main()
