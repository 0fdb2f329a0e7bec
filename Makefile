# Two commands for a fresh machine: `make run` (the main job) and `make test` (the whole suite).
# Both create or update .venv first; re-running is cheap when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedge-installed

.PHONY: venv run test lint clean

$(STAMP): pyproject.toml constraints-dev.txt examples/custom_plugin/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# One resolve for everything: installing the edge tools alone later can downgrade pydantic and break flwr.
	$(BIN)/python -m pip install --quiet -c constraints-dev.txt -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/fedge fl run

test: venv
	$(BIN)/pytest

# The import contract is checked on the built wheel (an editable install hides fedge.plugins & co. from it).
lint: venv
	$(BIN)/ruff check fedge plugins edge profiler tests
	$(BIN)/pytest -q tests/core/test_packaging.py

clean:
	rm -rf $(VENV) build dist *.egg-info
