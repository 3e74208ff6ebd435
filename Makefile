# procpool — every target sets itself up on a fresh machine (creates .venv when missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help demo test lint bench bench-scaling clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

.stamp-base: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

.stamp-test: .stamp-base
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

.stamp-bench: .stamp-base
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

.stamp-dev: .stamp-test
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: .stamp-base  ## run the tutorial's pool scenario for real (procpool demo)
	$(BIN)/procpool demo

test: .stamp-test  ## run the whole test suite (pytest)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: .stamp-dev  ## ruff (lint + format check) and mypy on the package
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src/procpool

bench: .stamp-bench  ## side-by-side benchmarks against multiprocessing, loky, mpire, pebble, faster-fifo
	@# compiled bytecode, as an installed package has (and the standard library always has):
	@# otherwise every import compiles, and workers' RSS counts the compiler's memory.
	@# -f: compileall trusts a compiled file whose source has its mtime (to the second),
	@# where import also checks the size -- an edit within that second went uncompiled
	$(BIN)/python -m compileall -f -q src benchmarks
	$(BIN)/python benchmarks/run_all.py

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .stamp-* build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
