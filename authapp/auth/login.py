"""Logging in: the credential check, and the per-account lockout around every check of a
password (a login, or the current password that a change requires)."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import update

from .. import audit, clock, ratelimit, settings
from ..database import unit_of_work
from ..errors import EmailNotVerified, InvalidCredentials, ValidationFailed
from ..mail import outbox
from ..models import User
from . import accounts, mailings, mfa, passwords, sessions
from .accounts import count_attempt, user_query
from .context import AuthContext, Client


def login(password: str, client: Client, email: str | None = None, username: str | None = None) -> dict[str, Any]:
    """Check credentials and start a session; every failure looks and costs the same."""
    rounds = settings.current().bcrypt_rounds
    with unit_of_work() as db:  # the user read and the attempt counted: one transaction
        user = db.scalar(user_query(email=email, username=username))
        account = ratelimit.account_key(user.id if user else None, email if email is not None else username or "")
        count_attempt(account, user.id if user else None, db)

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
    values: dict[str, Any] = {}
    if passwords.needs_rehash(user.hashed_password, rounds):
        values["hashed_password"] = passwords.hash_password(password, rounds)
        values["updated_at"] = now
    challenge = None
    with unit_of_work() as db:
        connection = db.connection()  # Core statements: none of the ORM's work per statement
        # Only if the hash checked above is still the stored one and the user still
        # active: a password change, reset or deactivation that committed while bcrypt
        # ran wins, and a rehash never overwrites a newer password's hash.
        # (With nothing to write, the hash over itself: the same check, the same lock.)
        unchanged = values or {"hashed_password": user.hashed_password}
        won = accounts.write_if_unchanged(connection, user.id, user.hashed_password, unchanged)
        # Session or challenge is decided under the user's row lock, which enabling MFA
        # takes too: an enable that committed first is seen here, one that comes later
        # ends the session started here.
        if won and mfa.is_enabled(connection, user.id):
            # Not logged in yet: no last_login, no session, the failed-login count kept
            # until the second factor (auth.mfa.verify).
            challenge = mfa.challenge(db, user.id, values.get("hashed_password", user.hashed_password), now)
        elif won:
            connection.execute(update(User).where(User.id == user.id).values(last_login=now))
            issued = sessions.start(connection, user.id, now, client)
            ratelimit.clear_failures(account, connection)  # with the session: one commit for both
    if not won:
        audit.record(audit.LOGIN_FAILURE, user_id=user.id, reason="credentials_changed")
        raise InvalidCredentials()
    if challenge is not None:
        audit.record(audit.MFA_CHALLENGE_ISSUED, user_id=user.id, by="login")
        return challenge
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
    stored = accounts.check_current_password(auth, current_password, audit.PASSWORD_CHANGE_FAILED)
    if passwords.normalize(new_password) == passwords.normalize(current_password):
        raise ValidationFailed(errors={"new_password": ["New password must differ from the current one."]})
    try:
        _revoked, issued = accounts.replace_password(auth.user, new_password, client, checked_hash=stored, auth=auth)
    except accounts.CredentialsChanged:
        audit.record(
            audit.PASSWORD_CHANGE_FAILED, user_id=auth.user_id, sid=auth.session_id, reason="credentials_changed"
        )
        raise
    ratelimit.clear_failures(account)
    return cast(sessions.Issued, issued).pair(auth.user)
