# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wildface-installed
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-fast test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Set up and run the whole pipeline on the built-in data (small, CPU).
demo: install
	$(BIN)/wildface demo

## Set up and run the whole test suite: fast tests, then the slow end-to-end group.
test: install
	$(BIN)/python -m pytest -m "not slow"
	$(BIN)/python -m pytest -m slow

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache
