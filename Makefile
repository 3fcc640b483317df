# Two commands do all the set-up: `make run` serves, `make test` checks everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint typecheck pytest bench test-container clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]' -e './clients/python[msgpack,django]'
	touch $@

run: $(VENV)/.installed-run  ## serve on 127.0.0.1:8888 with the memory broker
	$(BIN)/python run.py $(ARGS)

test: lint typecheck pytest  ## ruff, mypy (strict) and the whole test suite

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(BIN)/pytest $(ARGS)

$(VENV)/.installed-bench: pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]' -e ./clients/python
	touch $@

bench: $(VENV)/.installed-bench  ## fan-out benchmark vs a Tornado baseline and nchan
	$(BIN)/python bench/run.py $(ARGS)

test-container:  ## build the image with podman and smoke-test it (as root)
	bash scripts/container/smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
