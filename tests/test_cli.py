"""Operator commands through Flask's CLI runner: output, exit codes, error paths."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import PASSWORD, assert_error, base_settings, bearer, sid_of
from sqlalchemy import func, select, update

from authapp.extensions import db
from authapp.models import AuthSession, OutboxMessage, RefreshToken, User

NEW_PASSWORD = "granite-meadow-lantern-7"
ROOT = Path(__file__).resolve().parents[1]


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
        ("users", "delete"),
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


def test_create_with_prompt(cli, monkeypatch):
    monkeypatch.setattr("authapp.cli._has_terminal", lambda: True)
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
        ("users", "delete", "ghost", "--yes"),
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


def audit_events(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "authapp.audit" and getattr(r, "event", None) == event]


def test_list_prints_a_header(cli, tokens):
    lines = cli("users", "list").stdout.splitlines()
    assert lines[0] == "id\tusername\temail\tstate\tcreated\tlast_login"
    assert lines[1].split("\t")[:4] == [str(tokens["user"]["id"]), "alice", "alice@example.com", "active"]
    assert cli("users", "list", "--active-only").stdout.splitlines()[0].startswith("id\tusername")


def test_deactivating_an_inactive_user_says_so_and_audits_once(cli, tokens, caplog):
    caplog.set_level(logging.INFO, logger="authapp.audit")
    assert cli("users", "deactivate", "alice").stdout.startswith("deactivated user")
    again = cli("users", "deactivate", "alice")
    assert again.exit_code == 0
    assert again.stdout == f"user {tokens['user']['id']} alice is already inactive; nothing changed\n"
    assert len(audit_events(caplog, "user_deactivated")) == 1


def test_activating_an_active_user_says_so_and_audits_nothing(cli, tokens, caplog):
    caplog.set_level(logging.INFO, logger="authapp.audit")
    result = cli("users", "activate", "alice")
    assert result.exit_code == 0 and "is already active; nothing changed" in result.stdout
    assert audit_events(caplog, "user_activated") == []
    cli("users", "deactivate", "alice")
    assert cli("users", "activate", "alice").stdout.startswith("activated user")
    assert len(audit_events(caplog, "user_activated")) == 1


def test_delete_erases_the_user_its_sessions_and_tokens(app, cli, client, tokens, register, caplog):
    caplog.set_level(logging.INFO, logger="authapp.audit")
    other = register(username="bob")
    client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    user_id = tokens["user"]["id"]
    result = cli("users", "delete", "alice@example.com", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"deleted user {user_id}; 2 session(s) deleted\n"
    assert count(app, User, User.id == user_id) == 0
    assert count(app, AuthSession, AuthSession.user_id == user_id) == 0
    assert count(app, RefreshToken) == 1  # bob's
    # Her messages (the verification link of the registration) keep neither address nor body.
    with app.app_context():
        kept = db.session.execute(select(OutboxMessage.recipient, OutboxMessage.body_text)).all()
    assert ("alice@example.com", None) not in kept and not any("alice@" in str(row) for row in kept)
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 401
    refreshed = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 401
    assert client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 401
    assert client.get("/auth/me", headers=bearer(other["access_token"])).status_code == 200
    # The audit line keeps the id, and nothing personal.
    (event,) = audit_events(caplog, "user_deleted")
    assert event.user_id == user_id and event.sessions_deleted == 2
    assert not any("alice" in str(value) for value in vars(event).values())
    # The address is free again.
    assert (
        client.post(
            "/auth/register", json={"email": "alice@example.com", "username": "alice", "password": PASSWORD}
        ).status_code
        == 201
    )


def test_delete_asks_first(app, cli, tokens, monkeypatch):
    monkeypatch.setattr("authapp.cli._has_terminal", lambda: True)
    refused = cli("users", "delete", "alice", input="n\n")
    assert refused.exit_code == 1 and "for good? [y/N]" in refused.output
    assert count(app, User) == 1
    confirmed = cli("users", "delete", "alice", input="y\n")
    assert confirmed.exit_code == 0 and "deleted user" in confirmed.stdout
    assert count(app, User) == 0


def test_delete_without_terminal_or_yes_is_refused(app, cli, tokens):
    result = cli("users", "delete", "alice")
    assert result.exit_code == 1
    assert result.stderr == "Error: no terminal to ask on: give --yes to delete without confirmation\n"
    assert count(app, User) == 1


@pytest.mark.parametrize(
    "args,advice",
    [
        (["users", "create", "x@example.com", "xavier"], "give --password-stdin and write the password"),
        (["users", "set-password", "alice"], "give --password-stdin and write the password"),
    ],
)
def test_prompt_without_a_terminal_is_one_clear_line(app, tokens, args, advice):
    """A real process with no terminal (cron, ssh without -t, a pipe): one line, exit 1,
    no GetPassWarning and no "Aborted!"."""
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
        **base_settings(DATABASE_URL=app.config["SQLALCHEMY_DATABASE_URI"]),
    }
    result = subprocess.run(
        [str(Path(sys.executable).parent / "flask"), "--app", "wsgi", *args],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        start_new_session=True,  # no controlling terminal: getpass cannot open /dev/tty
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == f"Error: no terminal to ask on: {advice} to standard input"
    assert "Warning" not in result.stderr and "Aborted" not in result.stderr
    assert [line for line in result.stderr.splitlines() if not line.startswith("{")] == [result.stderr.splitlines()[-1]]
