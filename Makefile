# busy-guard: every target sets up what it needs (venv, pip and npm installs) on a fresh machine.
SHELL := /bin/bash
# The Lambda runtime's Python (3.13) where one is installed, else the newest 3.12 or 3.11.
PYTHON ?= $(shell scripts/find-python)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# What `make demo` alone needs: the sandbox extra (moto, Powertools, pydantic), not the dev tools.
DEMO_STAMP := $(VENV)/.demo-installed
NODE_STAMP := node_modules/.installed
LAMBDA_REQUIREMENTS := infra/lambda-requirements.txt
LAMBDA_DEPS := build/lambda-deps
LAMBDA_DEPS_STAMP := build/.lambda-deps-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install lambda-deps demo test lint typecheck pytest synth bench soak clean

help:
	@echo "make demo   - run the whole guard on a local sandbox (no AWS account)"
	@echo "make test   - lint, type-check, pytest, and synthesize the CDK app with the real cdk CLI"
	@echo "make synth  - cdk synth into cdk.out/ (no AWS credentials needed)"
	@echo "make bench  - benchmarks in tests/bench/, figures printed"
	@echo "make soak   - the model-based test of the whole system (tests/test_model.py), long profile"
	@echo "              (BUSY_GUARD_MODEL_ENGINE=dynamodb-local: its table on DynamoDB Local, not moto)"

define make_venv
	@test -n "$(PYTHON)" || { echo 'make: no Python 3.11 or later found' >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "venv Python: $$($(BIN)/python -c 'import sys; print(sys.version.split()[0], sys.executable)')"
	$(BIN)/pip install --quiet --upgrade pip
endef

$(STAMP): pyproject.toml $(LAMBDA_REQUIREMENTS)
	$(make_venv)
	$(BIN)/pip install --quiet -e '.[dev]' -c $(LAMBDA_REQUIREMENTS)
	touch $@

# The dev install is a superset: a venv that has it (and is current) needs nothing more.
$(DEMO_STAMP): pyproject.toml $(LAMBDA_REQUIREMENTS)
	$(make_venv)
	test $(STAMP) -nt pyproject.toml || $(BIN)/pip install --quiet -e '.[sandbox]' -c $(LAMBDA_REQUIREMENTS)
	touch $@

# The guard's layer: the Lambda runtime's platform (arm64, CPython 3.13), whatever this machine is.
# Wheels only, so nothing is compiled here; boto3 is the runtime's own.
$(LAMBDA_DEPS_STAMP): $(LAMBDA_REQUIREMENTS) | $(STAMP)
	rm -rf $(LAMBDA_DEPS)
	$(BIN)/pip install --quiet --no-compile --no-deps --target $(LAMBDA_DEPS)/python \
	  --platform manylinux2014_aarch64 --implementation cp --python-version 3.13 --only-binary=:all: \
	  -r $(LAMBDA_REQUIREMENTS)
	touch $@

lambda-deps: $(LAMBDA_DEPS_STAMP)

$(NODE_STAMP): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

install: $(STAMP) $(NODE_STAMP) $(LAMBDA_DEPS_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/busy-guard demo

SOURCES := $(wildcard lambdas infra tests examples)

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(NODE_STAMP) $(LAMBDA_DEPS_STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile

# The busy-guard stack into cdk.out/, and the example app's stack into cdk.out/examples/guarded_group/.
synth: $(STAMP) $(NODE_STAMP) $(LAMBDA_DEPS_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" npx --no-install cdk synth --quiet
	PATH="$(CURDIR)/$(BIN):$$PATH" npx --no-install cdk synth --quiet \
	  --app "python3 examples/guarded_group/guarded_group_app.py" --output cdk.out/examples/guarded_group

test: lint typecheck pytest synth

bench: $(STAMP)
	$(BIN)/python -m tests.bench

# The model-based test with a long budget (make test runs it on a small one).
soak: $(STAMP) $(NODE_STAMP)
	BUSY_GUARD_MODEL_EXAMPLES=$${BUSY_GUARD_MODEL_EXAMPLES:-60} BUSY_GUARD_MODEL_STEPS=$${BUSY_GUARD_MODEL_STEPS:-80} \
		$(BIN)/pytest -q -s tests/test_model.py

clean:
	rm -rf $(VENV) node_modules cdk.out build .pytest_cache .mypy_cache .ruff_cache .hypothesis
