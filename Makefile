# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format mypy bench bench-ingest bench-stream bench-status clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	./scripts/ensure-system-packages.sh

run: setup
	$(BIN)/python -m devstack

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

mypy: setup
	$(BIN)/mypy

bench: bench-ingest bench-stream bench-status

bench-ingest: setup
	$(BIN)/python -m bench.ingest $(BENCH_ARGS)

bench-stream: setup
	$(BIN)/python -m bench.stream $(BENCH_ARGS)

bench-status: setup
	$(BIN)/python -m bench.status $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
