# Two commands for a fresh machine: `make demo` and `make test`. Both set up what is missing first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_PY := $(VENV)/.installed
STAMP_NPM := node_modules/.installed
PAYMENTS ?= 50
SEED ?=

.PHONY: setup demo drill test lint migrate contracts check-contracts up ops-check screenshots bench clean

setup: $(STAMP_PY) $(STAMP_NPM)

$(STAMP_PY): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(STAMP_NPM): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	touch $@

demo: setup
	$(BIN)/python -m payments.demo --payments $(PAYMENTS)

# The fault drill: the real stack under kill -9s, an RPC outage, a PostgreSQL restart, dropped txs, a reorg,
# a front-run, a fee spike, overlapping runs and a removed signer; checked from the chain (SEED=N to repeat,
# REDUCED=1 for the test suite's short version).
drill: setup
	$(BIN)/python -m payments.drill $(if $(SEED),--seed $(SEED)) $(if $(REDUCED),--reduced) \
		$(if $(SECOND_CHANCE),--second-chance)

# Operator promises on a fresh local stack: alert latency, recovery start under load, idle noise.
ops-check: setup
	$(BIN)/python scripts/ops_check.py $(if $(SOAK),--soak-minutes $(SOAK))

# Stage throughput against the machine's limit; writes docs/BENCHMARKS.md (last line: JSON).
bench: setup
	$(BIN)/python scripts/bench.py

# docs/screenshots/*.png from a fresh local stack (needs Debian's chromium).
screenshots: setup
	$(BIN)/python scripts/screenshots.py

up: setup
	$(BIN)/python -m payments.up $(if $(RESET),--reset)

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

migrate: setup
	$(BIN)/python -m payments.migrate

contracts: $(STAMP_NPM)
	node contracts/compile.js

check-contracts: $(STAMP_NPM)
	node contracts/compile.js --check

clean:
	rm -rf .data
