# authapp: `make run` serves on SQLite at http://127.0.0.1:5000; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
PYTEST_ARGS ?=

.PHONY: run test browser lint format install install-dev clean

$(BIN)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(BIN)/.dev: requirements-dev.txt $(BIN)/.runtime
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(BIN)/.runtime
install-dev: $(BIN)/.dev

## run: install, build the SQLite schema with the migrations, serve on $(HOST):$(PORT)
run: install
	$(BIN)/flask --app wsgi db upgrade
	$(BIN)/flask --app wsgi run --host $(HOST) --port $(PORT)

## test: install, run the whole suite (PostgreSQL too when TEST_DATABASE_URL is set)
test: install-dev
	$(BIN)/pytest $(PYTEST_ARGS)

## browser: install, run the browser suite (tests/browser) in headless Debian chromium; fails if any of it is skipped
browser: install-dev
	BROWSER_TESTS=1 $(BIN)/pytest -m browser tests/browser $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) instance .pytest_cache .ruff_cache
