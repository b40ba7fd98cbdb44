# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wildface-installed
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-fast test-slow postgres gpu-wheels clean

# scripts/install_venv.py: uv installs the project with pip's settings (pip if uv fails).
$(STAMP): pyproject.toml scripts/install_venv.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python scripts/install_venv.py test
	touch $(STAMP)

install: $(STAMP)

## Set up and run the whole pipeline on the built-in data (small, CPU).
demo: install
	$(BIN)/wildface demo

## Set up and run the whole test suite: fast tests, then the slow end-to-end group, each
## listing its slowest tests. The fast group runs in one process (on 2 cores, workers of one
## thread each took longer: its longest module, test_fitting.py, then runs on one thread).
## The slow group runs on two pytest-xdist workers whatever the machine, a test module per
## worker (its module-scoped servers and data stay in one process): its tests mostly wait
## on Ray, Prefect and MLflow, and each worker runs its own servers.
PYTEST_FAST := -m "not slow" --durations=15
PYTEST_SLOW := -m slow --durations=15 -n 2 --dist loadscope

test: install
	$(BIN)/python -m pytest $(PYTEST_FAST)
	$(BIN)/python -m pytest $(PYTEST_SLOW)

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
