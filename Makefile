# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wildface-installed

.PHONY: install demo test test-fast test-slow postgres gpu-wheels clean

# scripts/install_venv.py: uv installs the project with pip's settings (pip if uv fails),
# then byte-compiles the project's packages.
$(STAMP): pyproject.toml scripts/install_venv.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python scripts/install_venv.py test
	touch $(STAMP)

install: $(STAMP)

## Set up and run the whole pipeline on the built-in data (small, CPU).
demo: install
	$(BIN)/wildface demo

## Set up and run the whole test suite: one pytest run on $(TEST_WORKERS) pytest-xdist workers,
## a test module per worker at a time (its module-scoped servers and data stay in one process).
## The modules with end-to-end tests (marker `slow`: Ray, Prefect, MLflow, training) start
## first and the fast modules fill the time around them (tests/conftest.py orders them;
## times in docs/benchmarks.md). Prints the 25 slowest tests. `make test-fast` / `make
## test-slow` run one group.
TEST_WORKERS ?= 2
PYTEST_ALL := --durations=25 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
PYTEST_FAST := -m "not slow" --durations=15
PYTEST_SLOW := -m slow $(PYTEST_ALL)

test: install
	$(BIN)/python -m pytest $(PYTEST_ALL)

test-fast: install
	$(BIN)/python -m pytest $(PYTEST_FAST)

test-slow: install
	$(BIN)/python -m pytest $(PYTEST_SLOW)

## PostgreSQL (Debian's package) for services.database and its test, when initdb is missing.
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL is installed"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q postgresql; \
	elif command -v sudo >/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q postgresql; \
	else echo "initdb not found: install Debian's postgresql package as root" >&2; exit 1; fi

## Wheels for a GPU machine whose Python has PyTorch but not wildface's pure-Python deps
## (benchmarks/gpu_check.sh installs them): into .whl/ (ignored), for Python 3.12 on x86-64.
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache
