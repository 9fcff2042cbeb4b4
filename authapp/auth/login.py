"""Logging in: the credential check, and the per-account lockout around every check of a
password (a login, or the current password that a change requires)."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import select, update

from .. import audit, clock, ratelimit, settings
from ..database import unit_of_work
from ..errors import AppError, InvalidCredentials, ValidationFailed
from ..models import User
from . import accounts, passwords, sessions
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
    ratelimit.clear_failures(account)

    now = clock.now()
    values: dict[str, Any] = {"last_login": now}
    if passwords.needs_rehash(user.hashed_password, rounds):
        values["hashed_password"] = passwords.hash_password(password, rounds)
        values["updated_at"] = now
    with unit_of_work() as db:
        db.execute(update(User).where(User.id == user.id).values(**values))
        issued = sessions.start(db, user.id, now, client)
    user.last_login = now
    audit.record(audit.LOGIN_SUCCESS, user_id=user.id, sid=issued.session.id)
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
    ratelimit.clear_failures(account)
    if passwords.normalize(new_password) == passwords.normalize(current_password):
        raise ValidationFailed(errors={"new_password": ["New password must differ from the current one."]})
    _revoked, issued = accounts.replace_password(auth.user, new_password, client)
    return cast(sessions.Issued, issued).pair(auth.user)
