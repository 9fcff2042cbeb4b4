"""authapp behind PgBouncer in transaction mode, with PgBouncer's stock settings (no
`ignore_startup_parameters`): migrations, the API's flows, and a statement timeout that
the server enforces on every transaction. Debian's pgbouncer, started by the test on a
free port in front of the shared PostgreSQL (a database of the test's own)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import flask_migrate
import pgbouncer as bouncer
import pgcluster
import pytest
from helpers import PASSWORD, TEST_DATABASE_URL, assert_error, base_settings, bearer, wait_until
from sqlalchemy.engine import make_url

from authapp import create_app, database
from authapp.extensions import db
from devtools.postgres import admin_connection

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL skipped: TEST_DATABASE_URL not set"),
    pytest.mark.skipif(not bouncer.available(), reason="needs Debian's pgbouncer"),
]


@pytest.fixture(scope="module")
def pgbouncer() -> Iterator[int]:
    """PgBouncer in transaction mode on a free port; yields the port."""
    with bouncer.running(TEST_DATABASE_URL) as port:
        yield port


@pytest.fixture
def bounced_database(pgbouncer) -> Iterator[tuple[str, str]]:
    """(URL through PgBouncer, direct URL) of a new, empty database."""
    name = f"authapp_test_{os.getpid()}_bouncer_{time.monotonic_ns() % 10**6}"
    direct = pgcluster.create_empty_database(TEST_DATABASE_URL, name)
    bounced = bouncer.through(direct, pgbouncer)
    yield bounced, direct
    pgcluster.drop_database(TEST_DATABASE_URL, name)


def test_migrations_and_the_api_flows_through_pgbouncer_in_transaction_mode(bounced_database):
    bounced, _ = bounced_database
    app = create_app(base_settings(DATABASE_URL=bounced))
    try:
        with app.app_context():
            flask_migrate.upgrade()  # through PgBouncer: no startup parameter it refuses
        client = app.test_client()
        body = {"email": "pat@example.com", "username": "pat", "password": PASSWORD}
        registered = client.post("/auth/register", json=body)
        assert registered.status_code == 201, registered.get_json()
        login = client.post("/auth/login", json={"username": "pat", "password": PASSWORD})
        assert login.status_code == 200, login.get_json()
        refreshed = client.post("/auth/refresh", json={"refresh_token": login.get_json()["refresh_token"]})
        assert refreshed.status_code == 200, refreshed.get_json()
        tokens = refreshed.get_json()
        for _ in range(5):  # different server connections behind PgBouncer, same answers
            me = client.get("/auth/me", headers=bearer(tokens["access_token"]))
            assert me.status_code == 200 and me.get_json()["username"] == "pat"
        out = client.post(
            "/auth/logout", json={"refresh_token": tokens["refresh_token"]}, headers=bearer(tokens["access_token"])
        )
        assert out.status_code == 204
        assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "TOKEN_REVOKED")
        health = client.get("/health")
        assert health.status_code == 200 and health.get_json()["checks"]["database"] == "ok"
    finally:
        with app.app_context():
            database.probe().stop()
            db.engine.dispose()


def test_the_statement_timeout_holds_on_every_transaction_behind_pgbouncer(bounced_database):
    bounced, direct = bounced_database
    settings = {"DATABASE_STATEMENT_TIMEOUT_MS": 1000, "DATABASE_CONNECT_TIMEOUT": 4}
    app = create_app(base_settings(DATABASE_URL=bounced, **settings))
    try:
        with app.app_context():
            flask_migrate.upgrade()
        client = app.test_client()
        body = {"email": "lee@example.com", "username": "lee", "password": PASSWORD}
        token = client.post("/auth/register", json=body).get_json()["access_token"]
        locked, release = threading.Event(), threading.Event()

        def hold_lock() -> None:
            with admin_connection(make_url(direct)) as conn, conn.cursor() as cur:
                conn.autocommit = False
                cur.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
                locked.set()
                release.wait(30)
                conn.rollback()

        holder = threading.Thread(target=hold_lock, daemon=True)
        holder.start()
        assert locked.wait(10)
        try:
            started = time.monotonic()
            response = client.get("/auth/me", headers=bearer(token))
            elapsed = time.monotonic() - started
            assert_error(response, 503, "SERVICE_UNAVAILABLE")
            # The server cancelled it (1 s), not the client's own deadline (1 + 4 s).
            assert 0.9 <= elapsed < 2.5, elapsed
            with admin_connection(make_url(direct)) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
                assert cur.fetchone()[0] == 0, "the server stopped waiting when the statement was cancelled"
        finally:
            release.set()
            holder.join(timeout=30)
        wait_until(lambda: client.get("/auth/me", headers=bearer(token)).status_code == 200, 10, "the lock released")
    finally:
        with app.app_context():
            database.probe().stop()
            db.engine.dispose()


def test_the_session_check_turns_to_the_plain_statement_behind_pgbouncer(bounced_database, log_lines):
    """SQL PREPARE lasts on one server connection, which transaction mode does not keep:
    when a prepared session check is missing there, the app sends the plain one from then on."""
    import psycopg2

    bounced, _ = bounced_database
    app = create_app(base_settings(DATABASE_URL=bounced))
    pinned = None
    try:
        with app.app_context():
            flask_migrate.upgrade()
            engine = db.engine
        client = app.test_client()
        body = {"email": "kim@example.com", "username": "kim", "password": PASSWORD}
        tokens = client.post("/auth/register", json=body).get_json()
        access = bearer(tokens["access_token"])
        assert client.get("/auth/me", headers=access).status_code == 200  # prepared there
        # A transaction held open takes the server connection that request used (PgBouncer
        # hands out the last one released): the next session check runs on another.
        pinned = psycopg2.connect(make_url(bounced).set(drivername="postgresql").render_as_string(hide_password=False))
        pinned.cursor().execute("SELECT 1")
        for _ in range(3):
            assert client.get("/auth/me", headers=access).get_json() == tokens["user"]
        assert engine in database._unprepared_engines
        assert [e["event"] for e in log_lines() if e.get("event") == "database_prepared_statements_off"] == [
            "database_prepared_statements_off"
        ]
        assert client.post("/auth/logout", headers=access).status_code == 204
        assert_error(client.get("/auth/me", headers=access), 401, "TOKEN_REVOKED")
    finally:
        if pinned is not None:
            pinned.close()
        with app.app_context():
            database.probe().stop()
            db.engine.dispose()
