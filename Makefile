# Entry points (see README). Everything runs in ./.venv, created by `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SERVICE ?= qwen-image-edit-nunchaku
PROFILE ?= full
STAMP := $(VENV)/.installed
PIP_FLAGS ?= --quiet --disable-pip-version-check
# The service folders with a Python package (every folder with a pyproject.toml but shared/):
# installed editable by `make setup`, nothing to list by hand (README, "Adding a service").
SERVICE_PACKAGES := $(filter-out shared,$(patsubst %/pyproject.toml,%,$(wildcard */pyproject.toml)))

.PHONY: setup demo test serve bench bench-gpu lint docs clean redis chromium

setup: $(STAMP)

$(STAMP): requirements-test.txt $(wildcard */pyproject.toml shared/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -r requirements-test.txt $(foreach p,$(SERVICE_PACKAGES),-e ./$(p))
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

# --only-machine-skips: a skip for anything but a missing GPU or real ComfyUI fails the run
test: setup lint redis chromium
	$(PY) -m pytest --only-machine-skips

# A Chromium for the web console's browser tests, driven by Playwright: Debian's chromium
# package (installed only when missing: root or sudo); on Ubuntu, Playwright's own Chromium
# (scripts/chromium.sh says why)
chromium: setup
	PY=$(PY) scripts/chromium.sh

# a real redis-server for the fleet tests (Debian's package, unpacked under build/redis)
redis: build/redis/redis-server

build/redis/redis-server: scripts/redis_server.sh
	scripts/redis_server.sh

serve: setup
	PROFILE=$(PROFILE) $(if $(PORT),PORT=$(PORT)) $(VENV)/bin/model-service serve $(SERVICE)

bench: setup
	$(PY) bench/run.py
	$(PY) bench/comfy.py
	$(PY) bench/stitch.py
	$(PY) bench/fleet.py
	$(PY) bench/gap.py
	$(PY) bench/retention.py

# On a GPU machine (torch with CUDA, diffusers, the services' packages and shared/testing installed; no venv
# needed): the transformers, VAE decodes and text encoder at full size on random weights,
# then the services end to end on full-size random files (COMFYUI_DIR: a ComfyUI checkout;
# about 90 GB of disk in all, the Qwen folder is removed before the ComfyUI part). bench/README
bench-gpu:
	python3 bench/gpu_dit.py --out build/bench-gpu.json
	python3 bench/gpu_dit.py --only wan --compile --out build/bench-gpu-compiled.json
	python3 bench/gpu_service.py qwen --out build/bench-gpu-qwen.json
	rm -rf /tmp/gpu-bench/qwen-models
	python3 bench/gpu_service.py fastwan --queued 4 --wan14b 480p 480p 720p \
		--comfyui-dir "$(COMFYUI_DIR)" --out build/bench-gpu-comfy.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint $(wildcard */Dockerfile shared/docker/*.Dockerfile)
	$(VENV)/bin/actionlint $(wildcard .github/workflows/*.yml)

docs: setup
	$(PY) -m model_service.config_docs --write README.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Build $(SERVICE)'s image on a locally made Debian base (no CUDA base, no Docker engine, no
# GPU), run it, check /health and a tiny job: scripts/image_smoke.sh (root; see README).
.PHONY: image-smoke
image-smoke:
	scripts/image_smoke.sh $(SERVICE)

# docker-compose.yml is generated from the service folders' image.toml (scripts/services.py)
.PHONY: compose
compose:
	python3 scripts/services.py compose > docker-compose.yml
