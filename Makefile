# Two commands for a fresh machine: `make demo` and `make test`. Both set up what is missing first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_PY := $(VENV)/.installed
STAMP_NPM := node_modules/.installed
PAYMENTS ?= 50

.PHONY: setup demo test lint migrate contracts check-contracts up clean

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

up: setup
	$(BIN)/python -m payments.up

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
