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
	@echo "make test   lint, unit and integration tests (installs what it needs, tools included)"
	@echo "make tools  build the pinned kube-apiserver, etcd, stripe-mock; fetch helm and kubectl into bin/"
	@echo "make lint   ruff and mypy --strict"
	@echo "make clean  remove .venv, bin, .cache and .dev"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

tools:
	tools/build.sh

lint: venv
	$(VENV)/bin/ruff check iotistic_billing tests bench
	$(VENV)/bin/ruff format --check iotistic_billing tests bench
	$(VENV)/bin/mypy iotistic_billing

format: venv
	$(VENV)/bin/ruff format iotistic_billing tests bench
	$(VENV)/bin/ruff check --fix iotistic_billing tests bench

unit: venv
	$(VENV)/bin/pytest tests/unit -q

integration: venv tools
	$(VENV)/bin/pytest tests/integration -q

# One pytest run for both layers, so the control plane and PostgreSQL start once per session.
test: venv tools lint
	$(VENV)/bin/pytest -q

dev: venv tools
	$(PY) -m iotistic_billing.devenv

clean:
	rm -rf $(VENV) bin .cache .dev .pytest_cache .mypy_cache .ruff_cache
