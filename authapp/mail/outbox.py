"""The outbox: messages written in the transaction of the change that causes them, and
the courier's side of it (claiming, settling, statistics, pruning).

A message is `queued` until a courier claims it (`sending`, with a lease), then `sent`,
`queued` again for a retry with backoff, or `given_up` once its give-up time has passed
or the server refused it for good. A sent or given-up message keeps no address and no
body. A `suppressed` row records a request that sends nothing (no such account, or the
recipient's MAIL_RATE_LIMIT reached), so that both kinds of request do the same work.

Claiming: on PostgreSQL the due rows are locked with `FOR UPDATE SKIP LOCKED`, so
couriers running at once take different messages; on SQLite one conditional UPDATE
claims them (SQLite has one writer at a time). A courier that dies while sending leaves
its claim to expire after the lease; the message is then sent again (at least once).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from limits import parse_many
from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from .. import audit, settings
from ..models import OutboxMessage
from . import transport
from .messages import Rendered

QUEUED, SENDING, SENT, GIVEN_UP, SUPPRESSED = "queued", "sending", "sent", "given_up", "suppressed"
RETRY_FIRST_DELAY = timedelta(seconds=30)
RETRY_MAX_DELAY = timedelta(hours=1)
# Finished rows stay this long past the rate-limit window (the window counts them).
KEEP_FINISHED = timedelta(days=1)


def recipient_key(address: str) -> str:
    return hashlib.sha256(address.strip().lower().encode()).hexdigest()


def _windows() -> list[tuple[int, timedelta]]:
    return [
        (item.amount, timedelta(seconds=item.get_expiry())) for item in parse_many(settings.current().mail_rate_limit)
    ]


def _lock_recipient(db: Session, key: str, kind: str) -> None:
    """Serialise the count-then-insert of one recipient's messages across processes
    (PostgreSQL; SQLite has a single writer already)."""
    if db.get_bind().dialect.name == "postgresql":
        lock_id = int.from_bytes(hashlib.sha256(f"{kind}:{key}".encode()).digest()[:8], "big", signed=True)
        db.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})


def _over_limit(db: Session, key: str, kind: str, now: datetime) -> bool:
    for amount, window in _windows():
        sent = db.scalar(
            select(func.count(OutboxMessage.id)).where(
                OutboxMessage.recipient_key == key,
                OutboxMessage.kind == kind,
                OutboxMessage.status != SUPPRESSED,
                OutboxMessage.created_at > now - window,
            )
        )
        if (sent or 0) >= amount:
            return True
    return False


def enqueue(
    db: Session,
    kind: str,
    recipient: str,
    message: Rendered,
    now: datetime,
    *,
    user_id: int | None,
    send: bool = True,
    give_up_at: datetime | None = None,
) -> OutboxMessage:
    """Add a message to the unit of work; with `send=False`, or past the recipient's
    MAIL_RATE_LIMIT for this kind, a `suppressed` row instead (the same statements)."""
    current = settings.current()
    key = recipient_key(recipient)
    _lock_recipient(db, key, kind)
    over = _over_limit(db, key, kind, now)
    status = QUEUED if send and not over else SUPPRESSED
    queued = status == QUEUED
    row = OutboxMessage(
        kind=kind,
        status=status,
        recipient_key=key,
        recipient=recipient if queued else None,
        user_id=user_id,
        subject=message.subject if queued else None,
        body_text=message.text if queued else None,
        body_html=message.html if queued else None,
        message_id=transport.new_message_id(current.mail_from),
        created_at=now,
        next_attempt_at=now,
        give_up_at=min(give_up_at or now + current.mail_give_up_after, now + current.mail_give_up_after),
        attempts=0,
        finished_at=None if queued else now,
        last_error=None if queued or not send else "rate limited",
    )
    db.add(row)
    db.flush()
    return row


def record(row: OutboxMessage) -> None:
    """The audit event of an enqueued row (after its transaction committed)."""
    if row.status == QUEUED:
        audit.record(audit.MAIL_QUEUED, user_id=row.user_id, message_id=row.id, kind=row.kind)
    elif row.last_error == "rate limited":
        audit.record(
            audit.MAIL_SUPPRESSED, user_id=row.user_id, message_id=row.id, kind=row.kind, reason="rate_limited"
        )


# -- The courier's side --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message a courier holds: what it needs to send it, detached from the session."""

    id: int
    kind: str
    user_id: int | None
    recipient: str
    subject: str
    body_text: str
    body_html: str
    message_id: str
    created_at: datetime
    attempts: int
    give_up_at: datetime
    claim: str


def _due(now: datetime) -> Any:
    return or_(
        and_(OutboxMessage.status == QUEUED, OutboxMessage.next_attempt_at <= now),
        and_(OutboxMessage.status == SENDING, OutboxMessage.claimed_until < now),
    )


def claim(db: Session, now: datetime, lease: timedelta, limit: int) -> list[Claimed]:
    """Take up to `limit` due messages for this courier, oldest first."""
    claim_id = str(uuid.uuid4())
    due = (
        select(OutboxMessage.id).where(_due(now)).order_by(OutboxMessage.next_attempt_at, OutboxMessage.id).limit(limit)
    )
    values = {
        "status": SENDING,
        "claimed_until": now + lease,
        "claimed_by": claim_id,
        "attempts": OutboxMessage.attempts + 1,
    }
    if db.get_bind().dialect.name == "postgresql":
        ids = list(db.scalars(due.with_for_update(skip_locked=True)))
        if not ids:
            return []
        db.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(**values))
    else:
        # One statement: the claim is made under SQLite's write lock, and the condition is
        # checked again there.
        db.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(due.scalar_subquery()), _due(now))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    rows = db.scalars(
        select(OutboxMessage).where(OutboxMessage.claimed_by == claim_id).order_by(OutboxMessage.id)
    ).all()
    return [
        Claimed(
            id=r.id,
            kind=r.kind,
            user_id=r.user_id,
            recipient=r.recipient or "",
            subject=r.subject or "",
            body_text=r.body_text or "",
            body_html=r.body_html or "",
            message_id=r.message_id,
            created_at=r.created_at,
            attempts=r.attempts,
            give_up_at=r.give_up_at,
            claim=claim_id,
        )
        for r in rows
    ]


_ERASED = {"recipient": None, "subject": None, "body_text": None, "body_html": None, "claimed_by": None}


def _settle(db: Session, message: Claimed, **values: Any) -> bool:
    result = db.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == message.id, OutboxMessage.claimed_by == message.claim)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def forget_user(db: Session, user_id: int, now: datetime) -> int:
    """Give up every message still waiting for a user who is being erased, and erase the
    address and bodies of all of theirs; returns how many were waiting."""
    waiting = db.execute(
        update(OutboxMessage)
        .where(OutboxMessage.user_id == user_id, OutboxMessage.status.in_((QUEUED, SENDING)))
        .values(status=GIVEN_UP, finished_at=now, last_error="account deleted", **_ERASED)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    db.execute(
        update(OutboxMessage)
        .where(OutboxMessage.user_id == user_id)
        .values(**_ERASED)
        .execution_options(synchronize_session=False)
    )
    return waiting


def mark_sent(db: Session, message: Claimed, now: datetime) -> bool:
    return _settle(db, message, status=SENT, finished_at=now, last_error=None, **_ERASED)


def backoff(attempts: int) -> timedelta:
    """30 s, 1 min, 2 min, ... up to an hour, each less up to a fifth at random (so that
    the messages of one outage do not all come back at once)."""
    delay = min(RETRY_FIRST_DELAY * 2 ** max(0, attempts - 1), RETRY_MAX_DELAY)
    return delay * (1 - random.random() / 5)


def mark_failed(db: Session, message: Claimed, now: datetime, error: str, *, permanent: bool) -> str:
    """Schedule a retry, or give up (permanent refusal, or past the give-up time);
    returns the new status."""
    retry_at = now + backoff(message.attempts)
    if permanent or retry_at > message.give_up_at:
        _settle(db, message, status=GIVEN_UP, finished_at=now, last_error=error[:255], **_ERASED)
        return GIVEN_UP
    _settle(
        db,
        message,
        status=QUEUED,
        next_attempt_at=retry_at,
        claimed_until=None,
        claimed_by=None,
        last_error=error[:255],
    )
    return QUEUED


def queue_stats(db: Any, now: datetime) -> tuple[int, float]:
    """(messages waiting, age in seconds of the oldest) for /metrics."""
    row = db.execute(
        select(func.count(OutboxMessage.id), func.min(OutboxMessage.created_at)).where(
            OutboxMessage.status.in_((QUEUED, SENDING))
        )
    ).one()
    oldest = row[1]
    if oldest is not None and oldest.tzinfo is None:  # a Core read on SQLite gives naive UTC
        from datetime import UTC

        oldest = oldest.replace(tzinfo=UTC)
    return int(row[0] or 0), max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0


def prune(db: Session, now: datetime) -> int:
    """Delete finished rows older than the longest rate-limit window plus a day."""
    longest = max((window for _, window in _windows()), default=timedelta(0))
    result = db.execute(
        delete(OutboxMessage).where(
            OutboxMessage.status.in_((SENT, GIVEN_UP, SUPPRESSED)),
            OutboxMessage.created_at < now - longest - KEEP_FINISHED,
        )
    )
    return result.rowcount  # type: ignore[attr-defined]
