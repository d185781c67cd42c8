# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test fuzz faults soak mutate lint format mypy bench bench-ingest bench-stream bench-status bench-page bench-replicas bench-resync bench-peer bench-reconcile bench-outbox replicas replicas-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	./scripts/ensure-system-packages.sh chromium nginx nchan promtool

run: setup
	$(BIN)/python -m devstack

# Two processes of each service behind Debian's nginx (deploy/nginx/nginx.conf); Ctrl-C stops.
# REPLICAS_ARGS="--replicas 3" or "--cluster" (a local 3-primary Redis Cluster).
REPLICAS_ARGS ?=
replicas: setup
	$(BIN)/python -m devstack.replicas $(REPLICAS_ARGS)

# The replica and Redis Cluster tests alone (both are part of `make test` too).
replicas-test: setup
	$(BIN)/pytest tests/test_replicas.py tests/test_redis_cluster.py $(PYTEST_ARGS)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

# The fuzz suite at length: FUZZ_SCALE times the example budget `make test` spends.
FUZZ_SCALE ?= 20
fuzz: setup
	$(BIN)/pytest tests/test_fuzz.py --fuzz-scale $(FUZZ_SCALE) -s $(PYTEST_ARGS)

# The whole fault suite, long tests included (`make test` runs its bounded part).
faults: setup
	$(BIN)/pytest tests/faults -m "faults or faults_long" $(PYTEST_ARGS)

# Mutation testing of the payment core (tests/mutation/): a table per module; not part of
# `make test` (about an hour on this machine). MUTATE_ARGS="cache limits" runs some modules only.
MUTATE_ARGS ?=
mutate: setup
	nice -n 10 $(BIN)/python -m tests.mutation $(MUTATE_ARGS)

# The system at a steady mixed load; memory and connection curves per process.
SOAK_ARGS ?=
soak: setup
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

mypy: setup
	$(BIN)/mypy

bench: bench-ingest bench-stream bench-status bench-page bench-replicas bench-resync bench-peer bench-reconcile bench-outbox

bench-ingest: setup
	$(BIN)/python -m bench.ingest $(BENCH_ARGS)

bench-stream: setup
	$(BIN)/python -m bench.stream $(BENCH_ARGS)

bench-status: setup
	$(BIN)/python -m bench.status $(BENCH_ARGS)

bench-page: setup
	$(BIN)/python -m bench.page $(BENCH_ARGS)

bench-replicas: setup
	$(BIN)/python -m bench.replicas $(BENCH_ARGS)

bench-resync: setup
	$(BIN)/python -m bench.resync $(BENCH_ARGS)

# The gateway side by side with nginx + nchan (Debian's libnginx-mod-nchan), same clients.
bench-peer: setup
	$(BIN)/python -m bench.peer $(BENCH_ARGS)

bench-reconcile: setup
	$(BIN)/python -m bench.reconcile $(BENCH_ARGS)

bench-outbox: setup
	$(BIN)/python -m bench.outbox $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
