"""The messages of the account flows, each rendered and put in the outbox inside the
caller's unit of work (so that it is sent if, and only if, the change commits)."""

from __future__ import annotations

from datetime import datetime
from email.utils import parseaddr
from typing import Any

from sqlalchemy.orm import Session

from .. import settings
from ..mail import messages, outbox
from ..models import OutboxMessage
from . import links


def service_name() -> str:
    """What the messages call the service: MAIL_FROM's display name, or "authapp"."""
    return parseaddr(settings.current().mail_from)[0].strip() or "authapp"


def _when(now: datetime) -> str:
    return now.strftime("%Y-%m-%d %H:%M UTC")


def context(user: Any, now: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "service_name": service_name(),
        "username": user.username,
        "email": user.email,
        "when": _when(now),
        "reset_page": settings.current().frontend_url + "/forgot-password",
        **extra,
    }


def password_reset(db: Session, user: Any, address: str, token: str, now: datetime, *, send: bool) -> OutboxMessage:
    """The reset link; with `send=False` (no such account) the same work, nothing queued."""
    lifetime = settings.current().password_reset_token_lifetime
    rendered = messages.render(
        messages.PASSWORD_RESET,
        **context(user, now, link=messages.password_reset_link(token), expires_in=messages.duration(lifetime)),
    )
    return outbox.enqueue(
        db,
        messages.PASSWORD_RESET,
        address,
        rendered,
        now,
        user_id=user.id if send else None,
        send=send,
        give_up_at=now + lifetime,  # a link that has expired is not worth delivering
    )


def password_changed(db: Session, user: Any, now: datetime) -> OutboxMessage:
    rendered = messages.render(messages.PASSWORD_CHANGED, **context(user, now))
    return outbox.enqueue(db, messages.PASSWORD_CHANGED, user.email, rendered, now, user_id=user.id)


def verify_email(db: Session, user: Any, now: datetime) -> OutboxMessage:
    """A new verification link for the user's current address (older ones void)."""
    lifetime = settings.current().email_token_lifetime
    token = links.issue(db, links.VERIFY_EMAIL, user.id, user.email, now, lifetime)
    rendered = messages.render(
        messages.VERIFY_EMAIL,
        **context(user, now, link=messages.email_verify_link(token), expires_in=messages.duration(lifetime)),
    )
    row = outbox.enqueue(
        db, messages.VERIFY_EMAIL, user.email, rendered, now, user_id=user.id, give_up_at=now + lifetime
    )
    links.settle(db, links.VERIFY_EMAIL, user.id, token, sent=row.status == outbox.QUEUED)
    return row


def change_email(db: Session, user: Any, new_email: str, now: datetime) -> tuple[OutboxMessage, OutboxMessage]:
    """The confirmation link to the new address, and the notice to the old one."""
    lifetime = settings.current().email_token_lifetime
    token = links.issue(db, links.CHANGE_EMAIL, user.id, new_email, now, lifetime)
    addresses = {"old_email": user.email, "new_email": new_email}
    confirm = messages.render(
        messages.CHANGE_EMAIL,
        **context(
            user, now, link=messages.email_verify_link(token), expires_in=messages.duration(lifetime), **addresses
        ),
    )
    notice = messages.render(messages.EMAIL_CHANGE_NOTICE, **context(user, now, **addresses))
    confirmation = outbox.enqueue(
        db, messages.CHANGE_EMAIL, new_email, confirm, now, user_id=user.id, give_up_at=now + lifetime
    )
    links.settle(db, links.CHANGE_EMAIL, user.id, token, sent=confirmation.status == outbox.QUEUED)
    return confirmation, outbox.enqueue(db, messages.EMAIL_CHANGE_NOTICE, user.email, notice, now, user_id=user.id)
