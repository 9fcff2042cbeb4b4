# authapp: `make run` serves on SQLite at http://127.0.0.1:5000; `make test` runs the suite;
# `make e2e` tests uwsgi.ini + nginx.conf on PostgreSQL; `make bench` measures them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
PYTEST_ARGS ?=

E2E_ARGS ?=
BENCH_ARGS ?=
# make bench creates (and drops) its own database on this server.
BENCH_DATABASE_URL ?= $(or $(TEST_DATABASE_URL),postgresql://postgres@127.0.0.1:5432/postgres)
# ... and runs the rate limiter on this Redis (its keys under a prefix of their own).
BENCH_REDIS_URL ?= $(or $(TEST_REDIS_URL),redis://127.0.0.1:6379/0)

.PHONY: run test browser lint format install install-dev e2e bench clean

$(BIN)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(BIN)/.dev: requirements-dev.txt $(BIN)/.runtime
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# uWSGI (compiled from source by pip: gcc and the Python headers)
$(BIN)/.deploy: requirements-deploy.txt $(BIN)/.dev
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-deploy.txt
	touch $@

install: $(BIN)/.runtime
install-dev: $(BIN)/.dev

## run: install, build the SQLite schema with the migrations, serve on $(HOST):$(PORT), with
## the mail courier beside it (MAIL_URL=console: by default: each message printed here)
run: install
	$(BIN)/flask --app wsgi db upgrade
	$(BIN)/flask --app wsgi mail courier & courier=$$!; \
	trap 'kill $$courier 2>/dev/null; wait $$courier' EXIT INT TERM; \
	$(BIN)/flask --app wsgi run --host $(HOST) --port $(PORT)

## test: install, run the whole suite (PostgreSQL too when TEST_DATABASE_URL is set)
test: install-dev
	$(BIN)/pytest $(PYTEST_ARGS)

## browser: install, run the browser suite (tests/browser) in headless Debian chromium; fails if any of it is skipped
browser: install-dev
	BROWSER_TESTS=1 $(BIN)/pytest -m browser tests/browser $(PYTEST_ARGS)

## e2e: uwsgi.ini and nginx.conf on PostgreSQL (TEST_DATABASE_URL), tested through nginx
e2e: $(BIN)/.deploy
	@test -n "$(TEST_DATABASE_URL)" || { echo "make e2e needs TEST_DATABASE_URL=postgresql://..." >&2; exit 1; }
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { echo "make e2e needs nginx (apt-get install nginx)" >&2; exit 1; }
	AUTHAPP_E2E=1 timeout -k 60 1500 $(BIN)/pytest tests/e2e $(E2E_ARGS)

## bench: wrk through nginx and uWSGI on PostgreSQL, each endpoint beside its reference
bench: $(BIN)/.deploy
	@command -v wrk >/dev/null || { echo "make bench needs wrk (apt-get install wrk)" >&2; exit 1; }
	timeout -k 60 1200 $(BIN)/python bench/bench.py --database-url "$(BENCH_DATABASE_URL)" --redis-url "$(BENCH_REDIS_URL)" $(BENCH_ARGS)

## lint: ruff (lint and format) over the tree, mypy over authapp/ and config.py
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) instance .pytest_cache .ruff_cache
