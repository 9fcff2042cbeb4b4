"""The session check of every protected request: one statement, prepared once per
PostgreSQL connection and plain on SQLite, with the same row on both; immediate
revocation; the statement timeout on it; the plain statement when prepared ones do not
last (a pooler in transaction mode)."""

from __future__ import annotations

import pytest
from helpers import TEST_DATABASE_URL, assert_error, bearer, sid_of, statements_sent

from authapp import database
from authapp.auth import context
from authapp.extensions import db
from authapp.models import AuthSession, User


def _orm_row(sid: str, user_id: int) -> tuple:
    """The same columns read through the ORM: the models' own reading of the two rows."""
    user, session = db.session.get(User, user_id), db.session.get(AuthSession, sid)
    session_fields = ("revoked_at", "expires_at", "aal", "amr")
    return tuple(getattr(session if f in session_fields else user, f) for f in context.SessionRow._fields)


def _read(sid: str, user_id: int):
    return context.read_session(sid, user_id)


def test_the_row_is_the_models_own_on_either_backend(app, tokens):
    sid, user_id = sid_of(tokens), tokens["user"]["id"]
    with app.app_context():
        first, again = _read(sid, user_id), _read(sid, user_id)  # on PostgreSQL: prepared, then executed
        assert first == again == _orm_row(sid, user_id)
        assert first.created_at.utcoffset().total_seconds() == 0 and first.is_active is True
        assert _read(sid, user_id + 1) is None and _read("no-such-session", user_id) is None


def test_the_user_out_is_the_same_on_either_backend(client, tokens):
    me = client.get("/auth/me", headers=bearer(tokens["access_token"])).get_json()
    assert me == tokens["user"]


def test_the_select_list_names_the_row():
    assert context.SessionRow._fields == (
        *context.PUBLIC_USER_COLUMNS, "mfa_enabled_at", "revoked_at", "expires_at", "aal", "amr"
    )  # fmt: skip
    assert "password_hash" not in context.SESSION_CHECK_SQL


def test_a_revocation_is_seen_by_the_next_request_at_once(client, tokens):
    access = bearer(tokens["access_token"])
    assert client.get("/auth/me", headers=access).status_code == 200
    assert client.post("/auth/logout", headers=access).status_code == 204
    assert_error(client.get("/auth/me", headers=access), 401, "TOKEN_REVOKED")


@pytest.mark.parametrize("settings", [{"DATABASE_STATEMENT_TIMEOUT_MS": "1500"}])
@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL skipped: TEST_DATABASE_URL not set")
def test_prepared_once_per_connection_and_bounded_by_the_statement_timeout(app, client, tokens):
    with app.app_context():
        engine = db.engine
    with statements_sent(engine) as statements:  # the session check starts on a new connection
        for _ in range(3):
            assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
        with app.app_context(), engine.connect() as connection:
            names = connection.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars().all()
    checks = [s for s in statements if "authapp_session_check" in s]
    assert len(checks) == 3
    assert all(s.startswith("SET LOCAL statement_timeout = 1500; ") for s in checks)
    assert "PREPARE" in checks[0] and all("PREPARE" not in s and "EXECUTE" in s for s in checks[1:])
    assert names == [context._SESSION_CHECK.name]  # the pool's one connection


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL skipped: TEST_DATABASE_URL not set")
def test_a_prepared_statement_that_is_gone_turns_preparing_off(app, client, tokens, log_lines):
    access = bearer(tokens["access_token"])
    assert client.get("/auth/me", headers=access).status_code == 200
    with app.app_context(), db.engine.connect() as connection:
        connection.exec_driver_sql("DEALLOCATE ALL")  # what another server connection looks like
        connection.commit()
        engine = db.engine
    assert client.get("/auth/me", headers=access).get_json() == tokens["user"]
    assert engine in database._unprepared_engines
    (warning,) = [e for e in log_lines() if e.get("event") == "database_prepared_statements_off"]
    assert warning["sqlstate"] == "26000" and warning["level"] == "WARNING"
    assert client.post("/auth/logout", headers=access).status_code == 204
    assert_error(client.get("/auth/me", headers=access), 401, "TOKEN_REVOKED")  # the plain statement


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL skipped: TEST_DATABASE_URL not set")
def test_a_statement_prepared_by_a_failed_request_is_used(app, client, tokens):
    """PREPARE outlives the EXECUTE that failed with it (a timeout): the next request finds
    the statement there (42P05) and executes it."""
    access = bearer(tokens["access_token"])
    with app.app_context(), db.engine.connect() as connection:
        connection.exec_driver_sql(context._SESSION_CHECK.prepare)
        connection.commit()
        engine = db.engine
    assert client.get("/auth/me", headers=access).get_json() == tokens["user"]
    assert client.get("/auth/me", headers=access).status_code == 200
    assert engine not in database._unprepared_engines
