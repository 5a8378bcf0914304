# Two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test run test check lint format bench-recall bench-load clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The service alone: light (no model, no test tools).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# Plus the test tools and the optional embeddings extra, which the tests exercise.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Install, create a development .env when none exists, and serve on 0.0.0.0:8000.
run: install
	$(BIN)/elaoms setup --non-interactive
	$(BIN)/python main.py

## Install everything (Python packages, and the Redis server and wrk the tests use) and run every test.
test: install-test check
	./scripts/install-test-services.sh
	$(BIN)/pytest

## Lint, format check and type check (run by `make test`, so by CI).
check: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

lint:
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-recall: install-test
	$(BIN)/python bench/recall.py --data $(or $(DATA),bench-data/locomo)

bench-load: install-test
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
