# Two commands do all the set-up: `make run` serves, `make test` checks everything.
# Both install Squall into .venv (editable: the checkout is what runs), so every
# command in the docs is `.venv/bin/python run.py ...`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check
ARGS ?=

.PHONY: run docs test lint typecheck pytest bench test-container clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]' -e './clients/python[msgpack,django]'
	touch $@

run: $(VENV)/.installed-run  ## serve on 127.0.0.1:8888 with the memory broker; ARGS='--port 9000' adds flags
	$(BIN)/python run.py $(ARGS)

docs: $(VENV)/.installed-run  ## regenerate the settings tables of README.md, docs/ and deploy/ from config/settings.py
	$(BIN)/python -m config.doc_tables

test: lint typecheck pytest  ## ruff, mypy (strict) and the whole test suite

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(BIN)/pytest $(ARGS)

$(VENV)/.installed-bench: pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[bench]' -e ./clients/python
	touch $@

bench: $(VENV)/.installed-bench  ## fan-out benchmark vs a Tornado baseline and nchan
	$(BIN)/python bench/run.py $(ARGS)

test-container:  ## build the image with podman and smoke-test it (as root)
	bash scripts/container/smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
