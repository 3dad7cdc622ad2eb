# One entry point per job; every target installs what it needs first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PERSONS ?= 100000
SEED ?= 7
PORT ?= 8000
WORKDIR ?= .gateway/demo

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway demo --persons $(PERSONS) --seed $(SEED) --port $(PORT) --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/ingest_throughput.py --persons 1000000
	$(BIN)/python bench/policy_decision.py
	$(BIN)/python bench/aggregate_vs_duckdb.py --persons 1000000

clean:
	rm -rf $(VENV) .gateway .pytest_cache .mypy_cache .ruff_cache
