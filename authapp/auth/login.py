"""Logging in: the credential check, and the per-account lockout around every check of a
password (a login, or the current password that a change requires)."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import select

from .. import audit, clock, ratelimit, settings
from ..database import unit_of_work
from ..errors import AppError, EmailNotVerified, InvalidCredentials, ValidationFailed
from ..mail import outbox
from ..models import User
from . import accounts, mailings, passwords, sessions
from .accounts import user_query
from .context import AuthContext, Client


def count_attempt(account: str, user_id: int | None) -> None:
    """Count one password check on the account's lockout, or raise RATE_LIMITED (audited)."""
    try:
        ratelimit.count_attempt(account)
    except AppError:
        audit.record(audit.LOGIN_LOCKED, user_id=user_id)
        raise


def login(password: str, client: Client, email: str | None = None, username: str | None = None) -> dict[str, Any]:
    """Check credentials and start a session; every failure looks and costs the same."""
    rounds = settings.current().bcrypt_rounds
    with unit_of_work() as db:
        user = db.scalar(user_query(email=email, username=username))
    account = ratelimit.account_key(user.id if user else None, email if email is not None else username or "")
    count_attempt(account, user.id if user else None)

    if user is None:
        # Same bcrypt work as a wrong password, so timing does not reveal the account.
        passwords.verify_password(password, passwords.dummy_hash(rounds))
        reason = "unknown_user"
    elif not passwords.verify_password(password, user.hashed_password):
        reason = "wrong_password"
    elif not user.is_active:
        reason = "inactive_user"
    else:
        reason = None
    if reason is not None:
        audit.record(audit.LOGIN_FAILURE, user_id=user.id if user else None, reason=reason)
        raise InvalidCredentials()
    if settings.current().email_verification == "required" and user.email_verified_at is None:
        audit.record(audit.LOGIN_FAILURE, user_id=user.id, reason="email_not_verified")
        # The right password: a new link, so that an expired one is no dead end
        # (MAIL_RATE_LIMIT bounds how many).
        with unit_of_work() as db:
            message = mailings.verify_email(db, user, clock.now())
        outbox.record(message)
        raise EmailNotVerified()

    now = clock.now()
    values: dict[str, Any] = {"last_login": now}
    if passwords.needs_rehash(user.hashed_password, rounds):
        values["hashed_password"] = passwords.hash_password(password, rounds)
        values["updated_at"] = now
    with unit_of_work() as db:
        # Only if the hash checked above is still the stored one and the user still
        # active: a password change, reset or deactivation that committed while bcrypt
        # ran wins, and a rehash never overwrites a newer password's hash.
        won = accounts.write_if_unchanged(db, user.id, user.hashed_password, values)
        if won:
            issued = sessions.start(db, user.id, now, client)
    if not won:
        audit.record(audit.LOGIN_FAILURE, user_id=user.id, reason="credentials_changed")
        raise InvalidCredentials()
    ratelimit.clear_failures(account)
    user.last_login = now
    audit.record(audit.LOGIN_SUCCESS, user_id=user.id, sid=issued.session.id)
    issued.record_ended()
    return issued.pair(user)


def change_password(auth: AuthContext, client: Client, current_password: str, new_password: str) -> dict[str, Any]:
    """Replace the password, end every session of the user and start a new one.

    Guesses of the current password count against the account like failed logins, so a
    stolen access token cannot be used to guess it without limit.
    """
    account = ratelimit.account_key(auth.user_id, "")
    count_attempt(account, auth.user_id)
    with unit_of_work() as db:  # the auth context's user row carries no hash
        stored = db.scalar(select(User.hashed_password).where(User.id == auth.user_id))
    if stored is None or not passwords.verify_password(current_password, stored):
        audit.record(audit.PASSWORD_CHANGE_FAILED, user_id=auth.user_id, sid=auth.session_id, reason="wrong_password")
        raise InvalidCredentials()
    if passwords.normalize(new_password) == passwords.normalize(current_password):
        raise ValidationFailed(errors={"new_password": ["New password must differ from the current one."]})
    try:
        _revoked, issued = accounts.replace_password(auth.user, new_password, client, checked_hash=stored)
    except accounts.CredentialsChanged:
        audit.record(
            audit.PASSWORD_CHANGE_FAILED, user_id=auth.user_id, sid=auth.session_id, reason="credentials_changed"
        )
        raise
    ratelimit.clear_failures(account)
    return cast(sessions.Issued, issued).pair(auth.user)
