"""Email verification and change of address.

EMAIL_VERIFICATION: `off` (no link is sent), `optional` (a link at registration and on
request), `required` (the same, and login answers 403 EMAIL_NOT_VERIFIED until the link
is used). A change of address needs the current password; the link goes to the new
address and a notice to the old one, and the address changes only when the link is used
(409 USER_ALREADY_EXISTS if another account took it meanwhile), verified by that use.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from .. import audit, clock, settings
from ..database import unit_of_work
from ..errors import UserAlreadyExists, ValidationFailed
from ..mail import outbox
from ..models import User
from . import accounts, links, mailings
from .context import AuthContext

OFF, OPTIONAL, REQUIRED = "off", "optional", "required"


def sends_links() -> bool:
    return settings.current().email_verification != OFF


def request_verification(auth: AuthContext) -> None:
    """Send a new verification link, unless the address is verified already."""
    user = auth.user
    if user.email_verified_at is not None:
        audit.record(audit.EMAIL_VERIFICATION_REQUESTED, user_id=user.id, sid=auth.session_id, outcome="verified")
        return
    now = clock.now()
    with unit_of_work() as db:
        row = mailings.verify_email(db, user, now)
    outcome = "queued" if row.status == outbox.QUEUED else "rate_limited"
    audit.record(audit.EMAIL_VERIFICATION_REQUESTED, user_id=user.id, sid=auth.session_id, outcome=outcome)
    outbox.record(row)


def _address_taken(db: Any, address: str, user_id: int) -> bool:
    return db.scalar(select(User.id).where(func.lower(User.email) == address.lower(), User.id != user_id)) is not None


def verify(token: str) -> User:
    """Use an email link: verify the address it was sent to, or (a change-of-address
    link) make it the account's address, verified."""
    now = clock.now()
    user_id = None  # read before a rollback expires the rows
    try:
        with unit_of_work() as db:
            link = links.find(db, token, now, links.VERIFY_EMAIL, links.CHANGE_EMAIL)
            user_id = link.user_id
            user = db.get(User, link.user_id)
            if user is None or not user.is_active:
                raise links.invalid((link.kind,), "inactive_user")
            if link.kind == links.VERIFY_EMAIL:
                if link.address.lower() != user.email.lower():  # sent to an address no longer the account's
                    raise links.invalid((link.kind,), "address_changed")
                links.spend(db, link, now)
                if user.email_verified_at is None:
                    db.execute(update(User).where(User.id == user.id).values(email_verified_at=now))
                    user.email_verified_at = now
                event: dict[str, Any] = {}
            else:
                if _address_taken(db, link.address, user.id):
                    raise UserAlreadyExists("Another account uses this address now")
                links.spend(db, link, now)
                old = user.email
                db.execute(
                    update(User)
                    .where(User.id == user.id)
                    .values(email=link.address, email_verified_at=now, updated_at=now)
                )
                links.void(db, user.id, links.VERIFY_EMAIL, links.CHANGE_EMAIL, links.PASSWORD_RESET)
                user.email, user.email_verified_at, user.updated_at = link.address, now, now
                event = {"changed": True, "old_email_key": outbox.recipient_key(old)[:12]}
    except IntegrityError:
        # An account registered with the address between the check and the update.
        audit.record(audit.EMAIL_CHANGE_FAILED, user_id=user_id, reason="address_taken")
        raise UserAlreadyExists("Another account uses this address now") from None
    except UserAlreadyExists:
        audit.record(audit.EMAIL_CHANGE_FAILED, user_id=user_id, reason="address_taken")
        raise
    audit.record(audit.EMAIL_CHANGED if event else audit.EMAIL_VERIFIED, user_id=user.id)
    return user


def request_change(auth: AuthContext, new_email: str, current_password: str) -> None:
    """Check the password, then send a confirmation link to `new_email` and a notice to
    the current address.

    The link is written only over the hash the password was checked against, for a user
    still active and a session still live: a change-email whose check raced a password
    change, a reset or a deactivation gets INVALID_CREDENTIALS and sends nothing."""
    checked = accounts.check_current_password(auth, current_password, audit.EMAIL_CHANGE_FAILED)
    user = auth.user
    now = clock.now()
    outcome = "queued"
    with accounts.still_checked(auth, checked, audit.EMAIL_CHANGE_FAILED) as db:
        if new_email == user.email.lower():
            outcome = "same_address"
        elif _address_taken(db, new_email, user.id):
            outcome = "address_taken"
        else:
            confirm, notice = mailings.change_email(db, user, new_email, now)
    if outcome == "same_address":
        raise ValidationFailed(errors={"new_email": ["This is already the account's address."]})
    if outcome == "address_taken":
        audit.record(audit.EMAIL_CHANGE_FAILED, user_id=user.id, sid=auth.session_id, reason="address_taken")
        raise UserAlreadyExists()
    audit.record(audit.EMAIL_CHANGE_REQUESTED, user_id=user.id, sid=auth.session_id)
    outbox.record(confirm)
    outbox.record(notice)
