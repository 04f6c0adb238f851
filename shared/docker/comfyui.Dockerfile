# The one Dockerfile of every ComfyUI service image (fastwan2.2-5b-network-storage,
# fastwan2.2-5b-packed, wan2.2-14b-loras-v1, infinite-talk-v1): a service's API and job
# engine in front of an embedded ComfyUI installed with comfy-cli. Build from the repository
# root (the context must hold shared/ and the service folder), naming the service folder:
#
#   docker build -f shared/docker/comfyui.Dockerfile --build-arg SERVICE=wan2.2-14b-loras-v1 \
#       -t wan2.2-14b-loras-v1 .
#
# A service folder may hold an `image.args` file: more build arguments for its image, one
# KEY=VALUE a line (the packed variant's: its code's folder, BAKE_WEIGHTS=1, MODELS_DIR);
# `scripts/services.py build-command <folder>` prints the whole command.
#
# Build arguments (the defaults are the published images'):
#   SERVICE        the service's folder and name (`model-service serve <SERVICE>`)
#   PACKAGE_DIR    the folder of its Python package (default: SERVICE)
#   BAKE_WEIGHTS   1: the service's model files are downloaded at build time (the manifest of
#                  its spec, sizes and sha256 checked) into MODELS_DIR, inside the image
#   MODELS_DIR, HF_HOME   where the service keeps its models (default: the network volume)
#   CUSTOM_NODES   space-separated custom nodes for ComfyUI: Comfy Registry ids (`id@version`),
#                  git URLs at a pinned ref (`https://github.com/o/r@<tag or commit>`) or
#                  folders of the build context (`./path`); see shared/docker/comfy-node-install.sh
#   EXTRA_MODELS   a manifest in the build context (the services' manifest format: Hub file or
#                  https URL, size, sha256, ComfyUI folder) of more model files, downloaded at
#                  build time into ComfyUI's own models folder (/opt/comfyui/models)
#   COMFYUI_REPO, COMFYUI_REF, COMFY_CLI_VERSION, TORCH_*, PIP_VERSION   what ComfyUI is
#
# To add nodes or models to a published image instead, build FROM it (README, "Custom nodes
# and models"): the image keeps comfy-cli, `comfy-node-install` and the torch constraint.
#
# Two Python environments: /opt/comfyui-venv runs ComfyUI (torch CUDA, ComfyUI's own
# requirements, the custom nodes'), /opt/venv runs the API (no torch); comfy-cli has its own
# (/opt/comfy-cli). ComfyUI listens on 127.0.0.1:8188 only; the API port is the one published.
# The container starts as root: the entrypoint (shared/docker/entrypoint.sh) gives the
# folders the service writes to uid 10001 (a RunPod network volume is root's) and runs the
# service as that user. Started with --user 10001 it checks them and says what to do.
#
# Stages: python-base (apt Python 3.12), comfyui (comfy-cli, torch, ComfyUI, custom nodes),
# api (our venv + wheels), weights (the baked model files, if any), runtime (the CUDA base).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS python-base

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

# Ubuntu package versions are not pinned: the archive drops superseded versions (security
# updates), so exact pins break rebuilds; the base image tag fixes the release (24.04).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DO_NOT_TRACK=1

# comfy-cli in a venv of its own (its dependencies stay out of ComfyUI's); `comfy` on PATH.
ARG PIP_VERSION=26.3
ARG COMFY_CLI_VERSION=1.23.0
RUN python3 -m venv /opt/comfy-cli \
    && /opt/comfy-cli/bin/pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && /opt/comfy-cli/bin/pip install --no-cache-dir "comfy-cli==${COMFY_CLI_VERSION}" \
    && ln -s /opt/comfy-cli/bin/comfy /usr/local/bin/comfy \
    && comfy --version

# ---------------------------------------------------------------------------------------------
FROM python-base AS comfyui

# torch first, alone, from the PyTorch CUDA 12.8 index, into ComfyUI's venv; the versions are
# kept as a constraint file (/opt/comfyui-venv/constraints.txt) that every later install in
# this venv (ComfyUI's requirements, custom nodes, a FROM image's nodes) is held to.
# TORCH_INDEX_URL, and TORCH_CUDA as the local version (empty: none, as on PyPI), are
# overridden only by the image smoke test (scripts/image_smoke.sh); the defaults are the GPU build.
ARG PIP_VERSION=26.3
ARG TORCH_VERSION=2.9.1
ARG TORCHVISION_VERSION=0.24.1
ARG TORCH_CUDA=cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
RUN python3 -m venv /opt/comfyui-venv \
    && suffix="${TORCH_CUDA:++${TORCH_CUDA}}" \
    && /opt/comfyui-venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && /opt/comfyui-venv/bin/pip install --no-cache-dir \
        --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}${suffix}" \
        "torchvision==${TORCHVISION_VERSION}${suffix}" \
        "torchaudio==${TORCH_VERSION}${suffix}" \
    && printf 'torch==%s%s\ntorchvision==%s%s\ntorchaudio==%s%s\n' \
        "$TORCH_VERSION" "$suffix" "$TORCHVISION_VERSION" "$suffix" \
        "$TORCH_VERSION" "$suffix" > /opt/comfyui-venv/constraints.txt

# ComfyUI at a release tag (0.33.0 or newer: the workflows and the tiny-model checks were
# written against v0.33.0), installed by comfy-cli into ComfyUI's venv (VIRTUAL_ENV picks the
# Python; --nvidia only names the GPU kind, torch is left as installed above and its
# requirements are held to it by PIP_CONSTRAINT); no ComfyUI-Manager (the services launch
# ComfyUI themselves; custom nodes come from comfy-node-install below). The repository may be
# a local path (the image smoke test's) and the tag is checked out from the clone: no GitHub
# API call.
ARG COMFYUI_REPO=https://github.com/Comfy-Org/ComfyUI.git
ARG COMFYUI_REF=v0.33.0
RUN VIRTUAL_ENV=/opt/comfyui-venv PIP_CONSTRAINT=/opt/comfyui-venv/constraints.txt \
        comfy --skip-prompt --workspace /opt/comfyui install \
        --url "${COMFYUI_REPO}" --version "${COMFYUI_REF#v}" \
        --nvidia --skip-torch-or-directml --skip-manager \
    && git -C /opt/comfyui log -1 --format='ComfyUI %H %s' \
    && rm -rf /opt/comfyui/.git \
    && mkdir -p /opt/comfyui/custom_nodes \
    && /opt/comfyui-venv/bin/pip check

# Custom nodes (none in the published images: their workflows use core nodes only).
COPY --chmod=755 shared/docker/comfy-node-install.sh /usr/local/bin/comfy-node-install
ARG CUSTOM_NODES=""
# hadolint ignore=SC2086
RUN --mount=type=bind,target=/src/context \
    if [ -n "${CUSTOM_NODES}" ]; then comfy-node-install ${CUSTOM_NODES}; fi

# ---------------------------------------------------------------------------------------------
FROM python-base AS api

ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}" \
        "setuptools==${SETUPTOOLS_VERSION}"

# Dependencies exactly as pinned in shared/pyproject.toml (read from it), then the wheels of
# the shared library and of the service's package.
COPY shared/pyproject.toml /src/shared/pyproject.toml
RUN python3 -c "import sys, tomllib; \
print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" \
        /src/shared/pyproject.toml > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm -f /tmp/requirements.txt

ARG SERVICE
ARG PACKAGE_DIR=${SERVICE}
COPY shared/src /src/shared/src
COPY ${PACKAGE_DIR} /src/service
RUN test -n "${SERVICE}" || { echo "--build-arg SERVICE=<service folder> is required" >&2; exit 1; } \
    && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation \
        --wheel-dir /wheels /src/shared /src/service \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /wheels/*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import sys; from model_service.cli import load_spec; \
spec = load_spec(sys.argv[1]); assert spec.comfy is not None, f'{spec.name} is no ComfyUI service'" \
        "${SERVICE}"

# ---------------------------------------------------------------------------------------------
FROM api AS weights

# BAKE_WEIGHTS=1: the service's manifest (from its spec) downloaded into /weights (sizes and
# sha256 checked: a mismatch fails the build). A Hugging Face token (only for gated files)
# goes in as a secret: docker build --secret id=hf_token,env=HF_TOKEN ...
# EXTRA_MODELS: more files for ComfyUI's own models folder, the same way.
ARG SERVICE
ARG BAKE_WEIGHTS=0
ARG EXTRA_MODELS=""
RUN --mount=type=secret,id=hf_token \
    --mount=type=bind,target=/src/context \
    if [ -f /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
    mkdir -p /weights /extra-models \
    && if [ "${BAKE_WEIGHTS}" = 1 ]; then \
        manifest="$(/opt/venv/bin/python -c "import sys; from model_service.cli import load_spec; \
print(load_spec(sys.argv[1]).comfy.manifest)" "${SERVICE}")" \
        && HF_HOME=/tmp/hf /opt/venv/bin/model-service download --manifest "$manifest" \
            --models-dir /weights; \
    elif [ "${BAKE_WEIGHTS}" != 0 ]; then \
        echo "BAKE_WEIGHTS must be 1 or 0, not '${BAKE_WEIGHTS}'" >&2; exit 1; \
    fi \
    && if [ -n "${EXTRA_MODELS}" ]; then \
        HF_HOME=/tmp/hf /opt/venv/bin/model-service download \
            --manifest "/src/context/${EXTRA_MODELS#./}" --models-dir /extra-models; \
    fi \
    && rm -rf /weights/.staging /extra-models/.staging /tmp/hf

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

# Same reason as above for not pinning Ubuntu package versions. git: for a FROM image's
# custom nodes from git; util-linux (setpriv, for the entrypoint) is in every Debian/Ubuntu.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl git python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && command -v setpriv

ARG APP_UID=10001
ARG MODELS_DIR=/runpod-volume/models
ARG HF_HOME=/runpod-volume/hf
RUN groupadd --system --gid "$APP_UID" app \
    && useradd --system --uid "$APP_UID" --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app \
    && mkdir -p /data "$MODELS_DIR" "$HF_HOME" \
    && chown -R app:app /data "$MODELS_DIR" "$HF_HOME" \
    && if [ -d /runpod-volume ]; then chown app:app /runpod-volume; fi

COPY --from=comfyui /opt/comfy-cli /opt/comfy-cli
COPY --from=comfyui /opt/comfyui-venv /opt/comfyui-venv
COPY --from=comfyui /opt/comfyui /opt/comfyui
COPY --from=api /opt/venv /opt/venv
COPY --chmod=755 shared/docker/comfy-node-install.sh /usr/local/bin/comfy-node-install
COPY --chmod=755 shared/docker/entrypoint.sh /usr/local/bin/entrypoint
COPY --from=weights /extra-models /opt/comfyui/models
COPY --from=weights --chown=10001:10001 /weights ${MODELS_DIR}
ARG SERVICE
RUN ln -s /opt/comfy-cli/bin/comfy /usr/local/bin/comfy \
    && /opt/venv/bin/python -c "import sys; from model_service.cli import load_spec; \
load_spec(sys.argv[1])" "${SERVICE}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=1 \
    SERVICE=${SERVICE} \
    DATA_DIR=/data \
    MODELS_DIR=${MODELS_DIR} \
    HF_HOME=${HF_HOME} \
    COMFYUI_DIR=/opt/comfyui \
    COMFYUI_VENV=/opt/comfyui-venv \
    COMFYUI_PYTHON=/opt/comfyui-venv/bin/python \
    COMFYUI_PORT=8188 \
    PORT=8189

ARG BASE_IMAGE
ARG IMAGE_SOURCE=""
ARG IMAGE_REVISION=""
ARG COMFYUI_REF=v0.33.0
ARG COMFY_CLI_VERSION=1.23.0
ARG CUSTOM_NODES=""
ARG DESCRIPTION="A model service over an HTTP job API, on an embedded ComfyUI."
LABEL org.opencontainers.image.title="${SERVICE}" \
      org.opencontainers.image.description="${DESCRIPTION}" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="${IMAGE_SOURCE}" \
      org.opencontainers.image.revision="${IMAGE_REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.comfyui.ref="${COMFYUI_REF}" \
      io.comfyui.comfy-cli="${COMFY_CLI_VERSION}" \
      io.comfyui.custom-nodes="${CUSTOM_NODES}"

# No USER: the entrypoint starts as root only to take the writable folders, then runs the
# service as uid 10001 (`--user 10001` works too, on folders that uid can already write).
WORKDIR /home/app
VOLUME ["/data"]
EXPOSE 8189

# /health answers as soon as the API is up; /ready says when a job can run (models
# downloaded, ComfyUI answering, workflows checked).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${PORT:-8189}/health\" > /dev/null || exit 1"]

# `sh -c` so that the service's name comes from $SERVICE (the same image, another name, as for
# the packed variant); the arguments of `docker run IMAGE ...` go to model-service serve.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint", "/bin/sh", "-c", \
            "exec model-service serve \"$SERVICE\" \"$@\"", "model-service"]
