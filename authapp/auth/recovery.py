"""Password reset: the request (a link by email) and the reset itself.

The request does the same work whether or not the address has an account: one look-up,
the same template rendered, the same rate-limit count and one outbox row (`suppressed`
when there is nothing to send), and never SMTP (the courier sends). The reset applies the
password policy before anything is spent, then in one transaction spends the token,
stores the password, verifies the address, ends every session, starts a new one and
queues the notice that the password changed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import update

from .. import audit, clock, ratelimit, settings
from ..database import unit_of_work
from ..errors import ValidationFailed
from ..mail import outbox
from ..models import AuthSession, User
from . import links, mailings, mfa, passwords, sessions
from .accounts import user_query
from .context import Client

PASSWORD_RESET = "password_reset"  # sessions.revoked_reason
# Stands in for the account an unknown address does not have, so that the same template
# is rendered either way.
_NOBODY = SimpleNamespace(id=None, username="user", email="user@example.com")


def request_reset(email: str) -> None:
    """Queue a reset link for the account of `email`, if it has an active one."""
    now = clock.now()
    lifetime = settings.current().password_reset_token_lifetime
    with unit_of_work() as db:
        user = db.scalar(user_query(email=email))
        eligible = user is not None and user.is_active
        if eligible:
            token = links.issue(db, links.PASSWORD_RESET, user.id, user.email, now, lifetime)
        else:
            # The same statements, on a decoy row that no link names.
            token = links.issue(db, links.PASSWORD_RESET, None, "", now, lifetime)
        row = mailings.password_reset(db, user if eligible else _NOBODY, email, token, now, send=eligible)
        links.settle(db, links.PASSWORD_RESET, user.id if eligible else None, token, sent=row.status == outbox.QUEUED)
    if user is None:
        outcome = "no_account"
    elif not user.is_active:
        outcome = "inactive_user"
    else:
        outcome = "queued" if row.status == outbox.QUEUED else "rate_limited"
    audit.record(audit.PASSWORD_RESET_REQUESTED, user_id=user.id if user else None, outcome=outcome)
    outbox.record(row)


def reset(token: str, new_password: str, client: Client) -> dict[str, Any]:
    """Set a new password with a reset link's token and start a new session."""
    current = settings.current()
    now = clock.now()
    with unit_of_work() as db:
        link = links.find(db, token, now, links.PASSWORD_RESET)
        user = db.get(User, link.user_id)
    if user is None or not user.is_active:
        raise links.invalid((links.PASSWORD_RESET,), "inactive_user")
    if link.address != user.email:  # sent to an address the account has since left
        raise links.invalid((links.PASSWORD_RESET,), "address_changed")
    problems = passwords.policy_problems(
        new_password, min_length=current.password_min_length, username=user.username, email=user.email
    )
    if problems:  # nothing spent: the same link works with a better password
        raise ValidationFailed(errors={"new_password": problems})
    hashed = passwords.hash_password(new_password, current.bcrypt_rounds)
    now = clock.now()
    with unit_of_work() as db:
        links.spend(db, link, now)
        values: dict[str, Any] = {"hashed_password": hashed, "updated_at": now}
        # The link reached the address: it is the user's, if it still is the account's.
        if user.email_verified_at is None and link.address.lower() == user.email.lower():
            values["email_verified_at"] = now
        # Only for a user still active: a deactivation that committed while bcrypt ran
        # wins (the link stays unspent: this transaction rolls back).
        written = db.execute(update(User).where(User.id == user.id, User.is_active.is_(True)).values(**values)).rowcount  # type: ignore[attr-defined]
        if written != 1:
            raise links.invalid((links.PASSWORD_RESET,), "inactive_user")
        revoked = sessions.revoke(db, PASSWORD_RESET, now, AuthSession.user_id == user.id)
        # A pending change of address (perhaps an attacker's) dies with the old password.
        links.void(db, user.id, links.PASSWORD_RESET, links.CHANGE_EMAIL)
        if mfa.is_enabled(db, user.id):  # the new password is the first step of a login
            issued, challenge = None, mfa.challenge(db, user.id, hashed, now)
        else:
            issued, challenge = sessions.start(db, user.id, now, client), None
        notice = mailings.password_changed(db, user, now)
    for name, value in values.items():
        setattr(user, name, value)
    if issued is None:
        # The failed-login count stays until the second factor is given (auth.mfa.verify).
        audit.record(audit.PASSWORD_RESET, user_id=user.id, sessions_revoked=revoked, mfa_required=True)
        audit.record(audit.MFA_CHALLENGE_ISSUED, user_id=user.id, by="password_reset")
        outbox.record(notice)
        return cast(dict[str, Any], challenge)
    ratelimit.clear_failures(ratelimit.account_key(user.id, ""))
    audit.record(audit.PASSWORD_RESET, user_id=user.id, sid=issued.session.id, sessions_revoked=revoked)
    issued.record_ended()
    outbox.record(notice)
    return issued.pair(user)
