# depthlab: the commands a new user types.
#   make quick   set up .venv and run the main job (every reproduction at laptop scale)
#   make test    run the test suite (make test-slow: the few long tests, > 5 s each)
#   make check   ruff format --check, ruff check, tests
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/quick
JOBS ?= 2

.PHONY: setup quick test test-slow test-ray test-real check lint format bench docs clean

$(BIN)/depthlab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,tensorboard]"
	@touch $@

setup: $(BIN)/depthlab

quick: setup
	$(BIN)/depthlab run all --preset quick --jobs $(JOBS) --out $(OUT)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# the Ray executor against a real local Ray cluster (installs the ray extra into .venv)
test-ray: setup
	$(BIN)/pip install -q -e ".[ray]"
	$(BIN)/python -m pytest -m ray

# convert against the real torchvision and timm: a second venv with the CUDA build of torch
# (it runs on the CPU; torchvision's extension does not load beside the CPU build), torchvision
# and timm; kept between runs (delete .venv-real to rebuild). DEPTHLAB_REAL_LIBS=1: a missing
# library fails the tests instead of skipping them.
REAL := .venv-real/bin
$(REAL)/depthlab: pyproject.toml
	$(PY) -m venv .venv-real
	$(REAL)/pip install -q --upgrade pip
	$(REAL)/pip install -q torch==2.14.1 torchvision==0.29.1 timm
	$(REAL)/pip install -q -e ".[dev]"
	@touch $@

test-real: $(REAL)/depthlab
	DEPTHLAB_REAL_LIBS=1 $(REAL)/python -m pytest -m real

lint: setup
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

check: lint test

# the documentation site (mkdocs-material, API reference from the docstrings) into site/;
# --strict: a broken link, a missing page or a missing benchmark CSV fails the build
docs: setup
	$(BIN)/pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: setup
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .venv-real runs site .pytest_cache
