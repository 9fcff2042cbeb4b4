"""`flask` commands for operators: `flask users ...`, `flask sessions ...` and `flask keys ...`
(authapp/keys_cli.py).

Each command exits 0 on success and 1 with one clear line on error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any, cast

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from marshmallow import ValidationError

from . import keys_cli
from .auth import accounts
from .auth import sessions as auth_sessions
from .clock import iso
from .errors import AppError
from .schemas import RegisterSchema

users = AppGroup("users", help="Create, list, activate and deactivate users; set a password.")
sessions = AppGroup("sessions", help="Revoke and prune sessions.")


def _clean_errors(command: Callable) -> Callable:
    """Turn domain errors into one line on stderr and exit code 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AppError as error:
            raise click.ClickException(error.detail) from None

    return wrapper


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def _checked(email: str, username: str, password: str) -> dict[str, Any]:
    """Apply the API's own rules for a new account (or a new password)."""
    try:
        return RegisterSchema().load({"email": email, "username": username, "password": password})
    except ValidationError as error:
        messages = cast(dict[str, list[str]], error.messages)  # a schema's errors: by field
        lines = [f"{field}: {' '.join(texts)}" for field, texts in sorted(messages.items())]
        raise click.ClickException("; ".join(lines)) from None


password_option = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of standard input."
)


@users.command("create")
@click.argument("email")
@click.argument("username")
@password_option
@_clean_errors
def create_user(email: str, username: str, password_stdin: bool) -> None:
    """Create a user (the password is prompted for, or read from stdin)."""
    data = _checked(email, username, _read_password(password_stdin))
    user, _ = accounts.create(**data)
    click.echo(f"created user {user.id} {user.username} <{user.email}>")


@users.command("list")
@click.option("--active-only", is_flag=True, help="Leave out deactivated users.")
@_clean_errors
def list_users(active_only: bool) -> None:
    """List users: id, username, email, active, created, last login."""
    for user in accounts.list_users(include_inactive=not active_only):
        last = iso(user.last_login) if user.last_login else "-"
        state = "active" if user.is_active else "inactive"
        click.echo(f"{user.id}\t{user.username}\t{user.email}\t{state}\t{iso(user.created_at)}\t{last}")


@users.command("deactivate")
@click.argument("user")
@_clean_errors
def deactivate(user: str) -> None:
    """Deactivate USER (id, email or username) and end all of its sessions."""
    found = accounts.find_user(user)
    revoked = accounts.set_active(found, False)
    click.echo(f"deactivated user {found.id} {found.username}; {revoked} session(s) revoked")


@users.command("activate")
@click.argument("user")
@_clean_errors
def activate(user: str) -> None:
    """Activate USER (id, email or username) again."""
    found = accounts.find_user(user)
    accounts.set_active(found, True)
    click.echo(f"activated user {found.id} {found.username}")


@users.command("set-password")
@click.argument("user")
@password_option
@_clean_errors
def set_password(user: str, password_stdin: bool) -> None:
    """Set USER's password (policy applies) and end all of its sessions."""
    found = accounts.find_user(user)
    data = _checked(found.email, found.username, _read_password(password_stdin))
    revoked, _ = accounts.replace_password(found, data["password"])
    click.echo(f"password set for user {found.id} {found.username}; {revoked} session(s) revoked")


@sessions.command("revoke-all")
@click.argument("user")
@_clean_errors
def revoke_all(user: str) -> None:
    """End every session of USER (id, email or username)."""
    found = accounts.find_user(user)
    revoked = auth_sessions.end_all(found.id, auth_sessions.ADMIN, by="operator")
    click.echo(f"{revoked} session(s) revoked for user {found.id} {found.username}")


@sessions.command("prune")
@click.option(
    "--revoked-days",
    type=click.IntRange(min=0),
    default=None,
    help="Delete sessions revoked longer ago than this (default: REFRESH_TOKEN_EXPIRE_DAYS).",
)
@_clean_errors
def prune(revoked_days: int | None) -> None:
    """Delete expired sessions, long-revoked sessions and expired refresh tokens."""
    days = revoked_days if revoked_days is not None else current_app.config["REFRESH_TOKEN_EXPIRE_DAYS"]
    deleted_sessions, deleted_tokens = auth_sessions.prune(timedelta(days=days))
    click.echo(f"pruned {deleted_sessions} session(s) and {deleted_tokens} refresh token(s)")


def init_app(app: Flask) -> None:
    """Register the operator commands with the app's CLI."""
    app.cli.add_command(users)
    app.cli.add_command(sessions)
    app.cli.add_command(keys_cli.group)
