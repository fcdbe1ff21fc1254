# Two entry points on a fresh machine: `make run` (the main job) and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip's local-index notices are noise; its own exit status still fails the build.
QUIET := 2>&1 | { grep -v 'is ignored' || true; }
# A local ESC-50 copy when there is one (this team's machines); else `esc50 main` downloads the archive.
ESC50_SOURCE ?= $(wildcard ../shared/esc50)
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install run test lint bench clean

# Byte-compiled at install, on every core: pip compiles one file after another (163 s of install
# here, against 77 + 41 s this way). Never left to first use: where PYTHONDONTWRITEBYTECODE is set
# (this team's machines) nothing would be written, and every Ray worker and CLI would recompile Ray,
# MLflow and the rest from source: the suite took 24 min instead of 11
# (bench/results/ci_run_20261129T035132Z.json). A file compileall cannot compile (one of torch's
# test helpers is Python 3.12) is compiled, or not, on import as before: its errors are ignored.
$(BIN)/esc50: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)
	$(BIN)/pip install -q --no-compile -e ".[dev]" $(QUIET)
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	$(BIN)/python -c "import torch, torchaudio, ray, optuna, mlflow, pyarrow, soundfile"
	touch $@

install: $(BIN)/esc50

# Main job on embedded defaults: local Ray on loopback, MLflow in ./mlflow.db, shards in ./data.
run: install
	$(BIN)/esc50 main $(if $(ESC50_SOURCE),--source $(ESC50_SOURCE))

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf data runs mlflow.db mlartifacts .pytest_cache
