# One entry point per job; every target installs what it needs first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PERSONS ?= 100000
SEED ?= 7
PORT ?= 8000
WORKDIR ?= .gateway/demo

.PHONY: install demo test lint opa opa-check deploy-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway demo --persons $(PERSONS) --seed $(SEED) --port $(PORT) --workdir $(WORKDIR)

# The suite includes the OPA parity tests, so it builds the real OPA first (cached; minutes
# the first time, a second after).
test: $(STAMP) opa
	$(BIN)/pytest

opa:
	@bash tools/build-opa.sh >/dev/null

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy

# The real OPA, built from its Go module (tools/build-opa.sh pins the version and caches the
# binary): strict compile with the JSON Schemas, formatting, and every *_test.rego. The
# schemas are not policy data, so `opa test` does not load them.
opa-check:
	@set -e; opa=$$(bash tools/build-opa.sh); \
	echo "opa check --strict --schema policies/schemas policies/"; \
	$$opa check --strict --schema policies/schemas policies/; \
	echo "opa fmt --list --fail policies/"; \
	if ! unformatted=$$($$opa fmt --list --fail policies/) || [ -n "$$unformatted" ]; then \
		echo "opa fmt: not formatted (run: $$opa fmt -w policies/): $$unformatted" >&2; exit 1; \
	fi; \
	echo "opa test --ignore schemas policies/"; \
	$$opa test --ignore schemas policies/

# The signed policy bundle (tools/build-bundle.sh; `opa build` with an ES256 key), at
# build/policy-bundle.tar.gz. The key never enters the repository: make one with
# `gateway policy keygen bundle-signing.pem bundle-signing.pub.pem`.
.PHONY: bundle
bundle: $(STAMP)
	@test -n "$(BUNDLE_KEY)" || { echo "usage: make bundle BUNDLE_KEY=path/to/private.pem" >&2; exit 2; }
	bash tools/build-bundle.sh --key "$(BUNDLE_KEY)"

# deploy/ without a Docker engine: hadolint, shellcheck, the compose-spec schema and the
# Kubernetes schemas (tools from the dev extra; see tools/check-deploy.sh).
deploy-check: $(STAMP)
	bash tools/check-deploy.sh

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/ingest_throughput.py --persons 1000000
	$(BIN)/python bench/policy_decision.py
	$(BIN)/python bench/rate_limit.py
	$(BIN)/python bench/aggregate_vs_duckdb.py --persons 1000000
	$(BIN)/python bench/pricing_vs_duckdb.py --persons 1000000
	$(BIN)/python bench/dp_vs_smartnoise.py
	$(BIN)/python bench/audit_log.py
	$(BIN)/python bench/enrollment_http.py
	$(BIN)/python bench/topology.py

clean:
	rm -rf $(VENV) .gateway .pytest_cache .mypy_cache .ruff_cache
