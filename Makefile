# Entry points a person or CI types; each one works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit integration e2e binaries bench bench-scale clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: local control plane + token server + operator + example TokenRequests
demo: $(STAMP)
	$(BIN)/python -m devenv.demo $(DEMO_ARGS)

## test: lint, type-check, then every test suite (unit, integration, e2e)
test: lint unit integration e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

integration: binaries
	$(BIN)/pytest tests/integration -q

binaries: $(STAMP)
	$(BIN)/python -m devenv.binaries

e2e: binaries
	$(BIN)/pytest tests/e2e -q

bench: $(STAMP)
	$(BIN)/python bench/cache_bench.py

## bench-scale: ours against the floor (bench/floor_operator.py) on a real control plane, alternating;
##   a table, then one JSON line (BENCH_ARGS="--quick", "--pairs N --count N")
bench-scale: binaries
	PYTHONPATH=. $(BIN)/python bench/scale_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
