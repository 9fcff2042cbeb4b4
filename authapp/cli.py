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
from sqlalchemy.exc import DBAPIError

from . import clock, keys_cli, ratelimit
from .auth import accounts, links, mfa
from .auth import sessions as auth_sessions
from .clock import iso
from .database import describe, unit_of_work
from .errors import AppError
from .mail import cli as mail_cli
from .mail import outbox
from .schemas import RegisterSchema

users = AppGroup("users", help="Create, list, activate, deactivate and delete users; set a password; turn MFA off.")
sessions = AppGroup("sessions", help="Revoke and prune sessions.")
tokens = AppGroup("tokens", help="Prune one-time link tokens (password reset, email).")


def _clean_errors(command: Callable) -> Callable:
    """Turn domain errors into one line on stderr and exit code 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AppError as error:
            raise click.ClickException(_with_cause(error)) from None

    return wrapper


def _with_cause(error: AppError) -> str:
    """The error's detail, and for a database error the driver's own words (why)."""
    cause = error.__cause__
    if isinstance(cause, DBAPIError):
        return f"{error.detail}: {describe(cause)}"
    return error.detail


def _has_terminal() -> bool:
    return sys.stdin.isatty()


def _need_terminal(instead: str) -> None:
    """A prompt needs a terminal: without one, say what to do instead (getpass would warn,
    read an empty line and abort)."""
    if not _has_terminal():
        raise click.ClickException(f"no terminal to ask on: {instead}")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    _need_terminal("give --password-stdin and write the password to standard input")
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
    click.echo("id\tusername\temail\tstate\tcreated\tlast_login")
    for user in accounts.list_users(include_inactive=not active_only):
        last = iso(user.last_login) if user.last_login else "-"
        state = "active" if user.is_active else "inactive"
        click.echo(f"{user.id}\t{user.username}\t{user.email}\t{state}\t{iso(user.created_at)}\t{last}")


@users.command("email-collisions")
@_clean_errors
def email_collisions() -> None:
    """List accounts whose addresses are one address once normalised (NFKC, lowercase).

    Such accounts date from before addresses were normalised; they are never merged. Each
    group is one line: the normalised address, then each account as id:address. Settle
    them by changing or deactivating all but one; login by address finds only the account
    stored in the normalised form."""
    groups = accounts.email_collisions()
    for form, members in groups.items():
        click.echo("\t".join([form, *(f"{user_id}:{email}" for user_id, email in members)]))
    if not groups:
        click.echo("no colliding addresses")


@users.command("deactivate")
@click.argument("user")
@_clean_errors
def deactivate(user: str) -> None:
    """Deactivate USER (id, email or username) and end all of its sessions."""
    found = accounts.find_user(user)
    if not found.is_active:
        click.echo(f"user {found.id} {found.username} is already inactive; nothing changed")
        return
    revoked = accounts.set_active(found, False)
    click.echo(f"deactivated user {found.id} {found.username}; {revoked} session(s) revoked")


@users.command("activate")
@click.argument("user")
@_clean_errors
def activate(user: str) -> None:
    """Activate USER (id, email or username) again."""
    found = accounts.find_user(user)
    if found.is_active:
        click.echo(f"user {found.id} {found.username} is already active; nothing changed")
        return
    accounts.set_active(found, True)
    click.echo(f"activated user {found.id} {found.username}")


@users.command("delete")
@click.argument("user")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_clean_errors
def delete_user(user: str, yes: bool) -> None:
    """Delete USER (id, email or username) with its sessions and tokens, for good.

    The audit trail keeps a line with the user's id only."""
    found = accounts.find_user(user)
    if not yes:
        _need_terminal("give --yes to delete without confirmation")
        click.confirm(f"Delete user {found.id} {found.username} <{found.email}> for good?", abort=True)
    deleted_sessions = accounts.delete_user(found)
    click.echo(f"deleted user {found.id}; {deleted_sessions} session(s) deleted")


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


@users.command("reset-mfa")
@click.argument("user")
@_clean_errors
def reset_mfa(user: str) -> None:
    """Turn multi-factor authentication off for USER (id, email or username), who lost the
    authenticator and the recovery codes, and end all of its sessions; the user logs in
    with the password alone and can set MFA up again."""
    found = accounts.find_user(user)
    was_on, revoked = mfa.reset(found)
    state = "turned off" if was_on else "was not on"
    click.echo(f"MFA {state} for user {found.id} {found.username}; {revoked} session(s) revoked")


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
    """Delete expired sessions, long-revoked sessions, refresh tokens no replay needs, and
    login attempts past the lockout window."""
    days = revoked_days if revoked_days is not None else current_app.config["REFRESH_TOKEN_EXPIRE_DAYS"]
    deleted_sessions, deleted_tokens = auth_sessions.prune(timedelta(days=days))
    deleted_attempts = ratelimit.prune_attempts()
    click.echo(
        f"pruned {deleted_sessions} session(s), {deleted_tokens} refresh token(s)"
        f" and {deleted_attempts} login attempt(s)"
    )
    _prune_links_and_outbox()


def _prune_links_and_outbox() -> None:
    with unit_of_work() as db:
        now = clock.now()
        deleted_links = links.prune(db, now)
        deleted_messages = outbox.prune(db, now)
    click.echo(f"pruned {deleted_links} one-time token(s) and {deleted_messages} finished outbox message(s)")


@tokens.command("prune")
@_clean_errors
def prune_tokens() -> None:
    """Delete spent and expired one-time link tokens and finished outbox messages
    (`flask sessions prune` does this too)."""
    _prune_links_and_outbox()


def init_app(app: Flask) -> None:
    """Register the operator commands with the app's CLI."""
    app.cli.add_command(users)
    app.cli.add_command(sessions)
    app.cli.add_command(tokens)
    app.cli.add_command(mail_cli.mail)
    app.cli.add_command(keys_cli.group)
