"""One-time link tokens: password reset, email verification, change of address.

A token is 32 random bytes (256 bits) in URL-safe base64; the database keeps only its
SHA-256, with the kind, the user, the address it was sent to, and its expiry. A new token
of a kind voids the user's older unspent ones of that kind. Spending is a conditional
UPDATE (`used_at IS NULL`), so of two requests racing with one token only one succeeds.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from .. import audit
from ..errors import InvalidLink
from ..models import OneTimeToken

PASSWORD_RESET = "password_reset"
VERIFY_EMAIL = "verify_email"
CHANGE_EMAIL = "change_email"
TOKEN_BYTES = 32
# Longest a token may be (43 characters for 32 bytes): anything longer is not one of ours.
MAX_LENGTH = 64


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue(db: Session, kind: str, user_id: int | None, address: str, now: datetime, lifetime: timedelta) -> str:
    """Add a new token of `kind` for the user to the unit of work; returns the token (to go
    into a link, and nowhere else). `user_id=None` writes a decoy, which no request can
    use. The older tokens stay until `settle` knows whether the new one is sent."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    db.add(
        OneTimeToken(
            kind=kind,
            user_id=user_id,
            token_hash=token_hash(token),
            address=address,
            created_at=now,
            expires_at=now + lifetime,
        )
    )
    return token


def settle(db: Session, kind: str, user_id: int | None, token: str, *, sent: bool) -> None:
    """Once the new token's message is queued (`sent`), void the older tokens of its kind;
    when nothing is sent (no account, or the recipient's MAIL_RATE_LIMIT reached), drop the
    new one instead, so that a request that sends nothing never voids a link already in
    the user's inbox. The same statement either way."""
    owner = OneTimeToken.user_id.is_(None) if user_id is None else OneTimeToken.user_id == user_id
    new = OneTimeToken.token_hash == token_hash(token)
    db.execute(
        delete(OneTimeToken).where(
            owner, OneTimeToken.kind == kind, OneTimeToken.used_at.is_(None), ~new if sent else new
        )
    )


def void(db: Session, user_id: int, *kinds: str) -> None:
    """Void the user's unspent tokens of `kinds`."""
    db.execute(
        delete(OneTimeToken).where(
            OneTimeToken.user_id == user_id, OneTimeToken.kind.in_(kinds), OneTimeToken.used_at.is_(None)
        )
    )


def invalid(kinds: tuple[str, ...], reason: str) -> InvalidLink:
    audit.record(audit.INVALID_LINK, kind=",".join(kinds), reason=reason)
    return InvalidLink()


def find(db: Session, token: str, now: datetime, *kinds: str) -> OneTimeToken:
    """The live token of one of `kinds`, unspent; INVALID_LINK (audited) otherwise."""
    if not token or len(token) > MAX_LENGTH:
        raise invalid(kinds, "malformed")
    row = db.scalar(select(OneTimeToken).where(OneTimeToken.token_hash == token_hash(token)))
    if row is None or row.kind not in kinds or row.user_id is None:
        raise invalid(kinds, "unknown")
    if row.used_at is not None:
        raise invalid(kinds, "used")
    if row.expires_at <= now:
        raise invalid(kinds, "expired")
    return row


def spend(db: Session, row: OneTimeToken, now: datetime) -> None:
    """Mark the token used in the unit of work; INVALID_LINK when another request spent it
    first."""
    result = db.execute(
        update(OneTimeToken)
        .where(OneTimeToken.id == row.id, OneTimeToken.used_at.is_(None), OneTimeToken.expires_at > now)
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise invalid((row.kind,), "used")


def prune(db: Session, now: datetime) -> int:
    """Delete spent and expired tokens; returns how many."""
    result = db.execute(
        delete(OneTimeToken).where(or_(OneTimeToken.used_at.is_not(None), OneTimeToken.expires_at <= now))
    )
    return result.rowcount  # type: ignore[attr-defined]
