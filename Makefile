# shoal: two commands on a fresh machine.
#   make up    creates .venv, installs, starts a local cluster with the example models
#   make test  creates .venv if needed, installs, runs lint, types and every test

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: up test lint typecheck unit integration e2e protos examples clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

examples/digits.joblib: examples/train_digits.py | $(STAMP)
	$(BIN)/python examples/train_digits.py examples/digits.joblib

examples: examples/digits.joblib

up: $(STAMP) examples/digits.joblib
	$(BIN)/shoal up --deploy examples/digits.yaml --deploy examples/echo.yaml

lint: $(STAMP)
	$(BIN)/ruff check shoal tests scripts examples bench
	$(BIN)/ruff format --check shoal tests scripts examples bench

typecheck: $(STAMP)
	$(BIN)/mypy shoal

test: lint typecheck
	$(BIN)/pytest -q $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

e2e: $(STAMP)
	$(BIN)/pytest -q tests/e2e $(PYTEST_ARGS)

# Regenerate the gRPC/protobuf modules from shoal/proto/*.proto.
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) .shoal .pytest_cache .mypy_cache .ruff_cache examples/*.joblib
