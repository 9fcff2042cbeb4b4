"""Fixtures: every API test runs on SQLite and, when TEST_DATABASE_URL is set, on
PostgreSQL, each on a fresh schema that the migrations built.

The migrations run once per backend into a template (a SQLite file, a PostgreSQL template
database); each test then gets its own copy, so a migration that drifts from the models
fails the tests while the suite stays fast. Databases the suite creates carry its process
id in their name and are dropped at the end.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import flask_migrate
import pgbouncer
import pytest
import skips
from flask import Flask
from flask.testing import FlaskClient
from helpers import PASSWORD, TEST_DATABASE_URL, base_settings
from sqlalchemy.engine import make_url

from authapp import create_app
from authapp.extensions import db
from authapp.observability.logs import make_handler
from devtools.postgres import admin_connection

_counter = itertools.count()


# Heavier suites run only when asked for (`.ci/run` asks for all of them):
#   pytest --with timing --with fuzz --with race
HEAVY_MARKERS = ("timing", "fuzz", "race")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--with",
        action="append",
        default=[],
        choices=HEAVY_MARKERS,
        dest="with_markers",
        help="also run the tests of a heavier suite (repeatable)",
    )
    parser.addoption(
        "--pgbouncer",
        action="store_true",
        help="run the PostgreSQL tests through a PgBouncer in transaction mode (tests/pgbouncer.py)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = set(config.getoption("with_markers"))
    for item in items:
        for marker in HEAVY_MARKERS:
            if marker in item.keywords and marker not in wanted:
                item.add_marker(pytest.mark.skip(reason=f"{marker} suite: run with --with {marker} (.ci/run does)"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    if TEST_DATABASE_URL:
        return [f"PostgreSQL: tests run on {make_url(TEST_DATABASE_URL).render_as_string(hide_password=True)}"]
    return ["PostgreSQL: SKIPPED, TEST_DATABASE_URL is not set; only SQLite is tested"]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Every skipped group, why, and the command that runs it (tests/skips.py)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if isinstance(r.longrepr, tuple)]
    total = sum(len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    for line in skips.summary([r.longrepr[2] for r in skipped], total + len(skipped)):
        terminalreporter.write_line(line, yellow=True)


# -- PostgreSQL databases -------------------------------------------------------------


def pg_create_database(name: str, template: str | None = None) -> str:
    """Create a database on the test server and return its URL."""
    with admin_connection(make_url(TEST_DATABASE_URL)) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return (
        make_url(TEST_DATABASE_URL)
        .set(drivername="postgresql+psycopg2", database=name)
        .render_as_string(hide_password=False)
    )


def pg_drop_database(name: str) -> None:
    with admin_connection(make_url(TEST_DATABASE_URL)) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- Templates built by the migrations ------------------------------------------------


def migrate(url: str) -> None:
    """Build the schema at `url` the way production does: `flask db upgrade`."""
    app = create_app(base_settings(DATABASE_URL=url))
    with app.app_context():
        flask_migrate.upgrade()
        db.engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate(f"sqlite:///{path}")
    return str(path)


@pytest.fixture(scope="session")
def pgbouncer_port(request) -> Iterator[int | None]:
    """With --pgbouncer, the port of the session's PgBouncer; otherwise None."""
    if not request.config.getoption("pgbouncer"):
        yield None
        return
    if not pgbouncer.available():
        pytest.fail("--pgbouncer needs Debian's pgbouncer")
    with pgbouncer.running(TEST_DATABASE_URL, pool_size=10) as port:
        yield port


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"authapp_test_tmpl_{os.getpid()}"
    migrate(pg_create_database(name))
    yield name
    pg_drop_database(name)


@contextmanager
def fresh_database(backend: str, request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A database URL with the migrated schema and no rows, dropped afterwards."""
    if backend == "sqlite":
        path = tmp_path / f"test-{next(_counter)}.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    template = request.getfixturevalue("pg_template")
    name = f"authapp_test_{os.getpid()}_{next(_counter)}"
    url = pg_create_database(name, template=template)
    port = request.getfixturevalue("pgbouncer_port")
    try:
        yield url if port is None else pgbouncer.through(url, port)
    finally:
        pg_drop_database(name)


@pytest.fixture(scope="session")
def database_factory():
    """`fresh_database` for fixtures of a wider scope than a test (module-scoped servers)."""
    return fresh_database


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL skipped: TEST_DATABASE_URL not set"),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def database_url(backend, request, tmp_path) -> Iterator[str]:
    with fresh_database(backend, request, tmp_path) as url:
        yield url


@pytest.fixture
def settings() -> dict[str, Any]:
    """Override in a test module (or parametrize) to change the app's settings."""
    return {}


@pytest.fixture
def app(database_url, settings) -> Iterator[Flask]:
    app = create_app(base_settings(DATABASE_URL=database_url, **settings))
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app) -> FlaskClient:
    return app.test_client()


# -- Data -------------------------------------------------------------------------------


@pytest.fixture
def register(client) -> Callable[..., dict[str, Any]]:
    """Register a user through the API and return the TokenResponse."""

    def _register(username: str | None = None, email: str | None = None, password: str = PASSWORD) -> dict:
        username = username or f"user{uuid.uuid4().hex[:8]}"
        email = email or f"{username}@example.com"
        response = client.post("/auth/register", json={"email": email, "username": username, "password": password})
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    return _register


@pytest.fixture
def tokens(register) -> dict[str, Any]:
    return register(username="alice", email="alice@example.com")


@pytest.fixture
def later(monkeypatch) -> Callable[[int], None]:
    """Move the service's clock forward by some seconds (PyJWT keeps the real clock)."""
    from authapp import clock

    def move(seconds: int) -> None:
        real = clock.now
        monkeypatch.setattr(clock, "now", lambda: real() + timedelta(seconds=seconds))

    return move


@pytest.fixture
def pg_database_url(request, tmp_path) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (for tests that exist only on PostgreSQL)."""
    if not TEST_DATABASE_URL:
        pytest.skip("PostgreSQL skipped: TEST_DATABASE_URL not set")
    with fresh_database("postgresql", request, tmp_path) as url:
        yield url


@pytest.fixture
def log_lines():
    """Everything the app logs during the test, as parsed JSON objects."""
    stream = io.StringIO()
    handler = make_handler(stream)
    logger = logging.getLogger("authapp")
    logger.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)


# -- Every request reaches the database through unit_of_work() -----------------------


class _EventRecorder(logging.Handler):
    def __init__(self, event: str) -> None:
        super().__init__()
        self.event = event
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == self.event:
            self.records.append(record)


@pytest.fixture(autouse=True)
def outside_unit_of_work() -> Iterator[list[logging.LogRecord]]:
    """Fails any test during which a request used the database outside unit_of_work(),
    where the breaker cannot see it. A test that provokes it on purpose clears the list."""
    recorder = _EventRecorder("database_outside_unit_of_work")
    logger = logging.getLogger("authapp.database")
    logger.addHandler(recorder)
    try:
        yield recorder.records
    finally:
        logger.removeHandler(recorder)
    assert recorder.records == [], "a request used the database outside unit_of_work()"
