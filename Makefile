# The two commands: `make demo` runs the whole pipeline on the embedded default, `make test` the suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KERAS_CACHE := $(or $(KERAS_HOME),$(HOME)/.keras)
DEBIAN_FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CONFIG ?= conf/default.yaml
COMPARE_CONFIG ?= conf/compare.yaml

# Prefect's temporary local server needs ~20 s to start on 2 cores; its default time-out is 20 s.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
export DVC_NO_ANALYTICS ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2
# The stages in dvc.yaml call `transferflow`, which `dvc repro` finds on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help install fashion-mnist demo-data demo train compare test test-fast lint mlflow-ui clean bench prefect-server serve stop-server

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# Which TensorFlow .venv holds: `make install GPU=1` the CUDA build (tensorflow[and-cuda], Linux
# x86_64 with an NVIDIA driver), GPU=0 the CPU build (tensorflow-cpu on x86_64). Without GPU=,
# a venv keeps the build it has, so a later `make test` or `make demo` never swaps a CUDA venv
# back; a new venv gets the CPU build.
TF_BUILD_FILE := $(VENV)/tensorflow-build
TF_BUILD := $(if $(filter 1,$(GPU)),cuda,$(if $(filter 0,$(GPU)),cpu,$(or $(shell cat $(TF_BUILD_FILE) 2>/dev/null),cpu)))
PIP := $(BIN)/python -m pip

$(VENV)/installed-cpu: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	if [ "$$(cat $(TF_BUILD_FILE) 2>/dev/null)" = cuda ]; then $(PIP) uninstall --quiet -y tensorflow; fi
	$(PIP) install --quiet -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c 'import tensorflow, keras, mlflow, prefect, dvc, pandas, pytest'
	rm -f $(VENV)/installed-cuda && echo cpu >$(TF_BUILD_FILE) && touch $@

# tensorflow-cpu and tensorflow[and-cuda] install the same `tensorflow` module, so the CUDA
# install never lets pip see the project's tensorflow-cpu: deploy/cuda_requirements.py lists the
# project's requirements with tensorflow[and-cuda] in its place, then the project goes in with
# --no-deps. The CUDA libraries come as pip packages (nvidia-*-cu12); the driver must be there.
$(VENV)/installed-cuda: pyproject.toml deploy/cuda_requirements.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	if $(PIP) show --quiet tensorflow-cpu 2>/dev/null; then $(PIP) uninstall --quiet -y tensorflow-cpu; fi
	$(BIN)/python deploy/cuda_requirements.py dev >$(VENV)/requirements-cuda.txt
	$(PIP) install --quiet -r $(VENV)/requirements-cuda.txt 2>&1 | grep -v '^WARNING: Location' || true
	$(PIP) install --quiet --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c 'import tensorflow as tf, keras, mlflow, prefect, dvc, pandas, pytest; \
	  from tasks.model.compute import device_description; print("TensorFlow trains on:", device_description())'
	rm -f $(VENV)/installed-cpu && echo cuda >$(TF_BUILD_FILE) && touch $@

install: $(VENV)/installed-$(TF_BUILD) ## Create .venv and install the project (GPU=1: TensorFlow's CUDA build, GPU=0: back to the CPU one)

fashion-mnist: ## Make Fashion-MNIST available offline (Keras cache, or Debian's dataset-fashion-mnist)
	@if [ -f $(KERAS_CACHE)/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -f $(DEBIAN_FMNIST) ]; then \
	  echo "Fashion-MNIST: found"; \
	else \
	  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

demo-data: install fashion-mnist ## Build the demo dataset, check it is the version data.dvc pins, push it to the local DVC remote
	$(BIN)/transferflow demo-data --config $(CONFIG)

# `dvc repro` runs the stages of dvc.yaml and records in dvc.lock what they ran on, so that
# `dvc status`, `dvc repro` and `dvc exp run` know them afterwards. `--force`: the demo always runs
# (a fresh clone has no data/ and no MLflow runs, even where a committed dvc.lock says the stages are
# up to date). Two calls, as data/ is data.dvc's, not the demo_data stage's: it must exist before the
# train stage (`--single-item`: not data.dvc again).
demo: install fashion-mnist ## Run the whole pipeline on the demo data through `dvc repro` (records dvc.lock)
	$(BIN)/dvc repro --force demo_data
	$(BIN)/dvc repro --force --single-item train

train: install ## Run the training flow on CONFIG without rebuilding the demo data
	$(BIN)/transferflow train --config $(CONFIG)

compare: demo-data ## Compare strategies at several label budgets on the demo data (FULL=1: every budget)
	$(BIN)/transferflow compare --config $(COMPARE_CONFIG) $(if $(FULL),--set compare.full=true)

test: install fashion-mnist ## Run the test suite (unit, integration and slow end-to-end tests)
	$(BIN)/python -m pytest

test-fast: install fashion-mnist ## Run the unit tests only (no slow, integration or training marker), for the edit-run loop
	$(BIN)/python -m pytest -m "not slow and not integration and not training"

lint: install ## ruff, mypy, and the import contracts in pyproject.toml (lint-imports)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy conf tasks flows && $(BIN)/lint-imports --no-logo

mlflow-ui: install ## Open the MLflow UI on the local store at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

# `make serve` keeps its Prefect server (state in .prefect/) running after it stops, for the UI.
PREFECT_PORT ?= 4200
PREFECT_API := http://127.0.0.1:$(PREFECT_PORT)/api
PREFECT_HEALTHY = $(BIN)/python -c "import urllib.request as u; u.urlopen('$(PREFECT_API)/health', timeout=2)" 2>/dev/null

# The UI asks the server where the API is (/ui-settings); Prefect 3.9 answers port 4200 whatever
# --port says unless PREFECT_UI_API_URL is set, and a UI on any other port then shows nothing.
prefect-server: ## Start the Prefect server `make serve` uses on PREFECT_PORT (UI and API), unless one answers there
	@mkdir -p .prefect; \
	if ! $(PREFECT_HEALTHY); then \
	  echo "Starting a Prefect server on http://127.0.0.1:$(PREFECT_PORT) (log .prefect/server.log; make stop-server stops it)"; \
	  PREFECT_HOME=$(CURDIR)/.prefect PREFECT_UI_API_URL=$(PREFECT_API) \
	    setsid $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) >.prefect/server.log 2>&1 & echo $$! >.prefect/server.pid; \
	  for _ in $$(seq 120); do $(PREFECT_HEALTHY) && break; sleep 1; done; \
	  $(PREFECT_HEALTHY) || { echo "The Prefect server did not start; see .prefect/server.log"; exit 1; }; \
	fi

serve: demo-data ## Serve the scheduled retraining deployment on the demo data (starts a Prefect server unless PREFECT_API_URL is set)
	@if [ -z "$$PREFECT_API_URL" ]; then \
	  $(MAKE) --no-print-directory prefect-server || exit 1; \
	  export PREFECT_HOME=$(CURDIR)/.prefect; \
	  export PREFECT_API_URL=$(PREFECT_API); \
	fi; \
	echo "Prefect UI: $${PREFECT_API_URL%/api}"; \
	$(BIN)/transferflow serve --config $(CONFIG)

stop-server: ## Stop the Prefect server that `make serve` or `make prefect-server` started
	@if [ -f .prefect/server.pid ]; then \
	  kill -- -$$(cat .prefect/server.pid) 2>/dev/null && echo "Prefect server stopped" || echo "Prefect server was not running"; \
	  rm -f .prefect/server.pid; \
	else echo "No Prefect server started by make serve or make prefect-server"; fi

clean: ## Remove local run state (MLflow store, feature cache, reports); keeps .venv and the data
	rm -rf mlflow.db mlartifacts .cache reports

bench: demo-data ## Benchmark against the machine's forward-pass limit and a plain Keras script
	$(BIN)/python bench/bench.py --config $(CONFIG)
