# MLNode — `make run` starts the node, `make test` runs every test tier this machine can run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

-include .env
export

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlnode-installed
TORCH_VERSION ?= 2.13.0
MLNODE_STATE_DIR ?= $(CURDIR)/.state
PYTEST_ARGS ?=

.PHONY: help setup setup-dev-env run stop status logs test unit-tests-local integration-tests-local \
        bench lint typecheck clean

help:
	@echo "make run     set up .venv and start the node under supervisord"
	@echo "make stop    stop the node;  make status  show its programs"
	@echo "make test    set up .venv and run every test tier this machine can run"
	@echo "make bench   run the benchmarks"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch goes in first, pinned, so that nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

setup setup-dev-env: $(STAMP)

run: $(STAMP)
	@MLNODE_STATE_DIR="$(MLNODE_STATE_DIR)" $(BIN)/mlnode up

stop: $(STAMP)
	@MLNODE_STATE_DIR="$(MLNODE_STATE_DIR)" $(BIN)/mlnode down

status: $(STAMP)
	@MLNODE_STATE_DIR="$(MLNODE_STATE_DIR)" $(BIN)/mlnode ctl status || true

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

unit-tests-local: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

integration-tests-local: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.bench

lint: $(STAMP)
	$(BIN)/ruff check node bus services tests

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache
