"""Errors that say why, and no noise: the driver's message in the logs and on the CLI
(never a parameter value), a missing or outdated schema named as such with its fix, the
same error logged once per interval, start-up warnings only when serving."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import flask_migrate
import pgcluster
import pytest
from helpers import PASSWORD, TEST_DATABASE_URL, base_settings
from sqlalchemy.engine import make_url

from authapp import create_app, database, schema_version, startup
from authapp.extensions import db
from authapp.lograte import ThrottledLog

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).with_name("flask"))
needs_pg = pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL skipped: TEST_DATABASE_URL not set")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == event]


@pytest.fixture
def logs() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("authapp")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def fresh_throttles(monkeypatch):
    """Each test sees the first line of each event (the throttles are per process)."""
    import authapp.health

    monkeypatch.setattr(database, "_throttled", ThrottledLog(database.log))
    monkeypatch.setattr(authapp.health, "log", ThrottledLog(logging.getLogger("authapp.health")))


def missing_database_url() -> str:
    return (
        make_url(TEST_DATABASE_URL)
        .set(drivername="postgresql+psycopg2", database=f"authapp_missing_{uuid.uuid4().hex[:8]}")
        .render_as_string(hide_password=False)
    )


def flask_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "JWT_", "ENVIRONMENT"))}
    environ.update(env)
    return subprocess.run(
        [FLASK, "--app", "wsgi", *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120
    )


# -- The driver's message ----------------------------------------------------------------


@needs_pg
def test_flask_db_upgrade_on_a_wrong_database_name_prints_one_line_with_why():
    result = flask_cli("db", "upgrade", DATABASE_URL=missing_database_url(), ENVIRONMENT="development")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "does not exist" in lines[0] and "flask_migrate" in lines[0]


@needs_pg
def test_an_operator_command_says_why_the_database_is_unavailable():
    app = create_app(base_settings(DATABASE_URL=missing_database_url()))
    result = app.test_cli_runner().invoke(args=["users", "deactivate", "alice"])
    assert result.exit_code == 1
    # The runner mixes stderr's JSON log line in; the command's own answer is the last line.
    lines = [line for line in result.output.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("Error: The database is unavailable: "), result.output
    assert "does not exist" in lines[0]


@needs_pg
def test_database_error_logs_the_drivers_message_and_never_a_parameter(logs):
    app = create_app(base_settings(DATABASE_URL=missing_database_url()))
    client = app.test_client()
    secret_name = "parameter-value-that-must-not-appear"
    response = client.post("/auth/login", json={"username": secret_name, "password": PASSWORD})
    assert response.status_code == 503
    (record,) = logs.events("database_error")
    assert "does not exist" in record.reason and record.reason in record.getMessage()
    assert record.error == "OperationalError"
    for record in logs.records:
        assert secret_name not in record.getMessage() and PASSWORD not in record.getMessage()
        assert secret_name not in str(vars(record))


def test_describe_keeps_the_first_line_and_never_the_statement():
    from sqlalchemy.exc import OperationalError

    exc = OperationalError(
        "SELECT * FROM users WHERE email = %(email)s", {"email": "x@example.com"}, Exception("boom\nline two")
    )
    assert database.describe(exc) == "boom"


def test_an_error_is_logged_once_per_interval_with_the_count_left_out():
    now = [100.0]
    logger = logging.getLogger("authapp.test_throttle")
    handler = Records()
    logger.addHandler(handler)
    try:
        throttle = ThrottledLog(logger, interval=60, clock=lambda: now[0])
        assert throttle.log(logging.ERROR, "storage_error", "down: %s", "why") is True
        for _ in range(41):
            assert throttle.log(logging.ERROR, "storage_error", "down: %s", "why") is False
        throttle.log(logging.ERROR, "other_error", "another event has its own interval")
        now[0] += 60
        throttle.log(logging.ERROR, "storage_error", "down: %s", "why")
    finally:
        logger.removeHandler(handler)
    assert [(r.event, r.suppressed) for r in handler.records] == [
        ("storage_error", 0),
        ("other_error", 0),
        ("storage_error", 41),
    ]
    assert handler.records[0].getMessage() == "down: why"


# -- A schema that was never migrated, or is older than the code ---------------------------


@pytest.fixture
def unmigrated(backend, tmp_path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/empty.db"
        return
    name = f"authapp_test_{os.getpid()}_empty_{uuid.uuid4().hex[:6]}"
    url = pgcluster.create_empty_database(TEST_DATABASE_URL, name)
    yield url
    pgcluster.drop_database(TEST_DATABASE_URL, name)


def test_a_database_never_migrated_is_a_clear_503_and_a_readiness_failure(unmigrated, logs):
    app = create_app(base_settings(DATABASE_URL=unmigrated, CIRCUIT_BREAKER_THRESHOLD=2))
    client = app.test_client()
    for _ in range(5):
        response = client.post(
            "/auth/register", json={"email": "a@example.com", "username": "alice", "password": PASSWORD}
        )
        body = response.get_json()
        assert (response.status_code, body["error_code"]) == (503, "SERVICE_UNAVAILABLE"), body
        assert body["detail"] == "The database schema is not up to date" and response.headers["Retry-After"]
    health = client.get("/health")
    assert health.status_code == 503
    assert health.get_json()["checks"] == {"database": "schema_outdated", "circuit_breaker": "closed"}, (
        "the database answered: the breaker stays closed"
    )
    (record,) = logs.events("database_schema_error")
    assert "flask --app wsgi db upgrade" in record.getMessage()
    assert any("flask --app wsgi db upgrade" in r.getMessage() for r in logs.events("schema_outdated"))
    with app.app_context():
        problem = schema_version.check_once(db.engine)
        db.engine.dispose()
    assert problem is not None and "db upgrade" in problem


def test_an_outdated_schema_names_the_revisions_and_the_fix(unmigrated, logs):
    app = create_app(base_settings(DATABASE_URL=unmigrated))
    with app.app_context():
        flask_migrate.upgrade(revision="0001_users")
        problem = schema_version.check_once(db.engine)
    assert problem is not None
    assert "revision 0001_users" in problem and "flask --app wsgi db upgrade" in problem
    assert [r.getMessage() for r in logs.events("schema_outdated")] == [problem]
    health = app.test_client().get("/health")
    assert health.status_code == 503 and health.get_json()["checks"]["database"] == "schema_outdated"
    with app.app_context():
        flask_migrate.upgrade()
        assert schema_version.check_once(db.engine) is None
        db.engine.dispose()
    assert app.test_client().get("/health").status_code == 200


# -- Noise ----------------------------------------------------------------------------------


def test_the_random_key_warning_is_for_serving_not_for_every_command(tmp_path):
    url = f"sqlite:///{tmp_path}/cli.db"
    upgrade = flask_cli("db", "upgrade", DATABASE_URL=url, ENVIRONMENT="development")
    listing = flask_cli("users", "list", DATABASE_URL=url, ENVIRONMENT="development")
    assert upgrade.returncode == 0 and listing.returncode == 0, (upgrade.stderr, listing.stderr)
    for result in (upgrade, listing):
        assert "JWT_SECRET_KEY is not set" not in result.stderr + result.stdout


def test_serving_means_a_wsgi_server_or_flask_run():
    import click

    assert startup.serving() is True  # no click command: a WSGI server imported the app
    with click.Context(click.Command("run"), info_name="run"):
        assert startup.serving() is True
    with click.Context(click.Command("upgrade"), info_name="upgrade"):
        assert startup.serving() is False


def test_serving_in_development_warns_once_about_the_key_and_quiets_werkzeug(tmp_path, logs):
    werkzeug = logging.getLogger("werkzeug")
    app = create_app({"ENVIRONMENT": "development", "DATABASE_URL": f"sqlite:///{tmp_path}/dev.db"})
    assert [r.getMessage() for r in logs.events("ephemeral_jwt_secret")] == [
        "JWT_SECRET_KEY is not set: using a random key; tokens die with this process"
    ]
    seen = Records()
    werkzeug.addHandler(seen)
    level = werkzeug.level
    werkzeug.setLevel(logging.INFO)  # as werkzeug sets it when it serves
    try:
        werkzeug.info('127.0.0.1 - - [01/Dec/2026 22:00:00] "%s" %s %s', "GET /health HTTP/1.1", "200", "-")
        werkzeug.info(" * Running on http://127.0.0.1:5000")
    finally:
        werkzeug.removeHandler(seen)
        werkzeug.setLevel(level)
    assert [r.getMessage() for r in seen.records] == [" * Running on http://127.0.0.1:5000"], (
        "the app logs each request already; werkzeug's start-up lines stay"
    )
    with app.app_context():
        db.engine.dispose()


def test_migrations_use_migration_database_url_when_it_is_set(tmp_path):
    import sqlite3

    app = create_app(
        base_settings(
            DATABASE_URL=f"sqlite:///{tmp_path}/app.db", MIGRATION_DATABASE_URL=f"sqlite:///{tmp_path}/direct.db"
        )
    )
    with app.app_context():
        flask_migrate.upgrade()
        db.engine.dispose()
    with sqlite3.connect(tmp_path / "direct.db") as direct:
        assert {row[0] for row in direct.execute("SELECT version_num FROM alembic_version")} == (
            schema_version.expected_heads()
        )
    with sqlite3.connect(tmp_path / "app.db") as used_by_the_app:
        tables = {row[0] for row in used_by_the_app.execute("SELECT name FROM sqlite_master")}
    assert "alembic_version" not in tables
