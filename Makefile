# shoal: two commands on a fresh machine.
#   make up    creates .venv, installs, starts a local cluster with the example models
#   make test  creates .venv if needed, installs, runs lint, types and every test

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: up test lint typecheck unit integration e2e protos examples clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,onnx,hf]'
	touch $(STAMP)

# What the tests need from Debian: headless Chromium for the dashboard test,
# iproute2/iptables for the multi-host tests, etcd for the etcd store and standby
# heads, curl for the docs' curl examples. Installed when missing and root; the tests that need them skip, saying why,
# elsewhere (under CI=true the etcd tests fail instead). A policy-rc.d that refuses
# keeps Debian from starting an etcd service on port 2379: tests start their own.
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/chromedriver /usr/sbin/ip /usr/sbin/iptables /usr/bin/etcd /usr/bin/curl
system-deps:
	@missing=0; for f in $(SYSTEM_TOOLS); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 1 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium, chromium-driver, iproute2, iptables, curl, etcd-server (Debian packages)"; \
		policy=0; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver iproute2 iptables curl >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null; \
		status=$$?; [ $$policy = 1 ] && rm -f /usr/sbin/policy-rc.d; exit $$status; \
	fi

examples/digits.joblib: examples/train_digits.py | $(STAMP)
	$(BIN)/python examples/train_digits.py examples/digits.joblib

examples: examples/digits.joblib

up: $(STAMP) examples/digits.joblib
	$(BIN)/shoal up --deploy examples/digits.yaml --deploy examples/echo.yaml

lint: $(STAMP)
	$(BIN)/ruff check shoal tests scripts examples bench
	$(BIN)/ruff format --check shoal tests scripts examples bench

typecheck: $(STAMP)
	$(BIN)/mypy shoal tests

# Three pytest workers: most tests wait on processes they start (CPU was about 70% used
# with two), so three fit on two cores (15 min in one process, 10.5-11.5 in two, 8 in
# three). --dist loadscope keeps each module's tests on one worker, so a module-scoped
# fixture (most often a running cluster) starts once, not once per worker: spread, the
# cluster of tests/integration/test_openai.py (torch and two models) started three times,
# 25 s each. (xdist's loadgroup, used before, groups nothing under pytest 9: it renames
# items through an attribute pytest 9 no longer reads.) Every test starts its servers on
# port 0, and the multi-host ones each make a bridge and subnet of their own, so modules
# run side by side.
test: lint typecheck system-deps
	$(BIN)/pytest -q -n 3 --dist loadscope $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

e2e: $(STAMP) system-deps
	$(BIN)/pytest -q tests/e2e $(PYTEST_ARGS)

# Regenerate the gRPC/protobuf modules from shoal/proto/*.proto.
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) .shoal .pytest_cache .mypy_cache .ruff_cache examples/*.joblib

# The benchmark suite beside the peers (not part of test): see bench/README.md.
# Phony: bench/ is also a folder, which would make the target look up to date.
.PHONY: bench
bench: $(STAMP)
	bench/run
