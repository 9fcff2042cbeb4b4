"""Operator commands through Flask's CLI runner: output, exit codes, error paths."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from helpers import PASSWORD, assert_error, bearer, sid_of
from sqlalchemy import func, select, update

from authapp.extensions import db
from authapp.models import AuthSession, RefreshToken, User

NEW_PASSWORD = "granite-meadow-lantern-7"


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def invoke(*args, input=None):
        return runner.invoke(args=list(args), input=input)

    return invoke


def count(app, model, *where):
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(model).where(*where))


@pytest.mark.parametrize(
    "group,command",
    [
        ("users", "create"),
        ("users", "list"),
        ("users", "deactivate"),
        ("users", "activate"),
        ("users", "set-password"),
        ("users", "email-collisions"),
        ("sessions", "revoke-all"),
        ("sessions", "prune"),
    ],
)
def test_every_command_has_help(cli, group, command):
    result = cli(group, command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_create_and_list(cli, client):
    result = cli("users", "create", "Dora@Example.com", "dora", "--password-stdin", input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert "created user" in result.stdout and "<dora@example.com>" in result.stdout
    assert client.post("/auth/login", json={"username": "dora", "password": PASSWORD}).status_code == 200
    listed = cli("users", "list")
    assert listed.exit_code == 0 and "dora\tdora@example.com\tactive" in listed.stdout


def test_create_with_prompt(cli):
    result = cli("users", "create", "eve@example.com", "eve", input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output


def test_create_refuses_bad_input_and_duplicates(cli, tokens):
    weak = cli("users", "create", "x@example.com", "xavier", "--password-stdin", input="password1\n")
    assert weak.exit_code == 1 and "password: This password is too common" in weak.stderr
    bad = cli("users", "create", "not-an-email", "x", "--password-stdin", input=PASSWORD + "\n")
    assert bad.exit_code == 1 and "email:" in bad.stderr and "username:" in bad.stderr
    taken = cli("users", "create", "ALICE@example.com", "alice2", "--password-stdin", input=PASSWORD + "\n")
    assert taken.exit_code == 1 and "already exists" in taken.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("users", "deactivate", "ghost"),
        ("users", "activate", "ghost"),
        ("sessions", "revoke-all", "404"),
        ("users", "set-password", "ghost@example.com", "--password-stdin"),
    ],
)
def test_unknown_user_is_a_clear_error(cli, args):
    result = cli(*args, input=PASSWORD + "\n")
    assert result.exit_code == 1
    assert "Error: No user matches" in result.stderr


def test_deactivate_and_activate(app, cli, client, tokens):
    result = cli("users", "deactivate", "alice@example.com")
    assert result.exit_code == 0 and "1 session(s) revoked" in result.stdout
    assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "USER_INACTIVE")
    login = client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert_error(login, 401, "INVALID_CREDENTIALS")
    assert "inactive" in cli("users", "list").stdout
    assert "alice" not in cli("users", "list", "--active-only").stdout

    assert cli("users", "activate", str(tokens["user"]["id"])).exit_code == 0
    assert client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 200
    # the sessions ended by deactivation stay ended
    assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "TOKEN_REVOKED")


def test_set_password(cli, client, tokens):
    result = cli("users", "set-password", "ALICE", "--password-stdin", input=NEW_PASSWORD + "\n")
    assert result.exit_code == 0 and "1 session(s) revoked" in result.stdout
    assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "TOKEN_REVOKED")
    assert client.post("/auth/login", json={"username": "alice", "password": NEW_PASSWORD}).status_code == 200
    weak = cli("users", "set-password", "alice", "--password-stdin", input="alice-rocks-123\n")
    assert weak.exit_code == 1 and "username" in weak.stderr


def test_revoke_all(cli, client, tokens):
    client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    result = cli("sessions", "revoke-all", "alice")
    assert result.exit_code == 0 and result.stdout.startswith("2 session(s) revoked")
    assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "TOKEN_REVOKED")


def test_prune(app, cli, client, tokens):
    live = client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).get_json()
    client.post("/auth/refresh", json={"refresh_token": live["refresh_token"]})
    expired = client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).get_json()
    revoked = client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).get_json()
    client.post("/auth/logout", headers=bearer(revoked["access_token"]))
    now = datetime.now(UTC)
    with app.app_context():
        db.session.execute(
            update(AuthSession).where(AuthSession.id == sid_of(expired)).values(expires_at=now - timedelta(seconds=1))
        )
        db.session.execute(
            update(AuthSession).where(AuthSession.id == sid_of(revoked)).values(revoked_at=now - timedelta(days=8))
        )
        db.session.commit()
    before = count(app, AuthSession)
    result = cli("sessions", "prune")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pruned 2 session(s)")
    assert count(app, AuthSession) == before - 2
    # live sessions and their token chains are untouched
    assert client.get("/auth/me", headers=bearer(live["access_token"])).status_code == 200
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    assert count(app, RefreshToken, RefreshToken.parent_id.is_not(None)) == 1
    assert count(app, User) == 1
