# Entry points a person or CI types; each one works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit packaging integration e2e binaries image bench bench-scale bench-soak bench-owned-secrets clean

# The operator image `make image` builds (override: make image IMAGE=registry/name:tag).
IMAGE ?= m2m-token-operator:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: local control plane + token server + operator + example TokenRequests
demo: $(STAMP)
	$(BIN)/python -m devenv.demo $(DEMO_ARGS)

## test: lint, type-check, then every test suite (unit, packaging, integration, e2e)
test: lint unit packaging integration e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

## unit: millisecond tests only (no network, no processes started)
unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

## packaging: the image's install steps in a fresh venv, from the package index (1-2 min)
packaging: $(STAMP)
	$(BIN)/pytest tests/packaging -q

integration: binaries
	$(BIN)/pytest tests/integration -q

## binaries: build (once) etcd, kube-apiserver, kube-controller-manager, kubectl and helm
binaries: $(STAMP)
	$(BIN)/python -m devenv.binaries

## image: build the operator image from the Dockerfile (docker, podman, buildah or nerdctl)
image:
	$(PYTHON) -m devenv.image --image $(IMAGE)

e2e: binaries
	$(BIN)/pytest tests/e2e -q

bench: $(STAMP)
	$(BIN)/python bench/cache_bench.py
	$(BIN)/python bench/fetch_cost_bench.py --repeats 3

## bench-scale: ours against the floor (bench/floor_operator.py) on a real control plane, alternating;
##   a table, then one JSON line (BENCH_ARGS="--quick", "--pairs N --count N")
bench-scale: binaries
	PYTHONPATH=. $(BIN)/python bench/scale_bench.py $(BENCH_ARGS)

## bench-soak: short tokens through endpoint outages, API-server freezes, operator kills;
## prints expired Secret-seconds (must be 0); one JSON line (BENCH_ARGS=--quick: ~1 min)
bench-soak: binaries
	PYTHONPATH=. $(BIN)/python bench/soak_bench.py $(BENCH_ARGS)

## bench-owned-secrets: labelled Secrets not ours (peak RSS), and a kill mid-burst (calls per scope)
bench-owned-secrets: binaries
	PYTHONPATH=. $(BIN)/python bench/owned_secrets_bench.py forged $(BENCH_ARGS)
	PYTHONPATH=. $(BIN)/python bench/owned_secrets_bench.py kill $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
