"""Refresh-token rotation: retire the token, mint its successor; a replay of a retired
token inside the reuse interval gets the session's current pair, a later one revokes the
session as stolen."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, literal, select, update
from sqlalchemy.orm import Session

from .. import audit, clock, settings
from ..database import unit_of_work
from ..errors import InvalidToken, TokenExpired, TokenRevoked, UserInactive
from ..models import AuthSession, RefreshToken, User
from . import sessions, tokens
from .context import user_id_of

# How far a replayed token's chain is followed to its current head.
_MAX_CHAIN_WALK = 100


def refresh(refresh_token: str) -> dict[str, Any]:
    """Rotate a refresh token: retire it and return a new pair in the same session.

    The retirement is one conditional UPDATE (`used_at IS NULL`), so of two concurrent
    refreshes of one token only one mints a child (and `parent_id` is unique besides).
    A well-signed token of a live session whose row is gone was retired and pruned
    (`sessions.prune` keeps every token not yet used): presented again, it is reuse.
    """
    claims = tokens.decode_refresh_token(refresh_token)
    jti, sid = claims.get("jti"), claims["sid"]
    if not isinstance(jti, str):
        raise InvalidToken()
    now = clock.now()
    with unit_of_work() as db:
        token, auth_session, user = _live_token(db, jti, sid, user_id_of(claims), now)
        issued = None if token is None else _rotate(db, token, auth_session, jti, now)
        event = audit.REFRESH
        if issued is None:  # retired already: a replay
            issued = _replayed(db, token, auth_session, jti, now)
            event = audit.REFRESH_REPLAY
    if issued is None:
        audit.record(audit.REUSE_DETECTED, user_id=user.id, sid=auth_session.id)
        raise TokenRevoked()
    audit.record(event, user_id=user.id, sid=auth_session.id)
    return issued.pair(user)


def _live_token(
    db: Session, jti: str, sid: str, user_id: int, now: datetime
) -> tuple[RefreshToken | None, AuthSession, User]:
    """The token's row (None when it was pruned) with its session and user, or the error
    that says why it is dead."""
    row = db.execute(
        select(RefreshToken, AuthSession, User)
        .join(AuthSession, RefreshToken.session_id == AuthSession.id)
        .join(User, AuthSession.user_id == User.id)
        .where(RefreshToken.jti_hash == tokens.jti_hash(jti))
    ).one_or_none()
    if row is not None:
        token, auth_session, user = row
    else:  # its session was deleted, or it was retired and pruned
        session_row = db.execute(
            select(AuthSession, User).join(User, AuthSession.user_id == User.id).where(AuthSession.id == sid)
        ).one_or_none()
        if session_row is None:
            raise InvalidToken()
        token = None
        auth_session, user = session_row
    if auth_session.id != sid or user.id != user_id:
        raise InvalidToken()
    if not user.is_active:
        raise UserInactive()
    if auth_session.revoked_at is not None:
        raise TokenRevoked()
    if auth_session.expires_at <= now:
        raise TokenExpired()
    return token, auth_session, user


def _rotate(
    db: Session, token: RefreshToken, auth_session: AuthSession, jti: str, now: datetime
) -> sessions.Issued | None:
    """Retire an unused token and add its successor; None when it was retired already
    (`token.used_at` then tells when)."""
    if token.used_at is None:
        child_jti = tokens.child_jti(jti)
        child = sessions.refresh_token_row(auth_session, child_jti, token.id, now)
        if _retire(db, token, child, now):
            return sessions.Issued(auth_session, child, child_jti)
        # A concurrent refresh of the same token retired it first.
        token.used_at = db.scalar(select(RefreshToken.used_at).where(RefreshToken.id == token.id))
    return None


def _retire(db: Session, token: RefreshToken, child: RefreshToken, now: datetime) -> bool:
    """Retire `token` if it is still unused (`used_at IS NULL`: of two concurrent refreshes
    only one retires it), store `child` as its successor (`parent_id` is unique besides)
    and mark the session used; False when the token was retired already.

    On PostgreSQL that is one statement (data-modifying WITH queries: the retirement, then
    the insert of the child from the row retired, and the session's last use), so one round
    trip instead of three; elsewhere (SQLite) three statements. Core statements, not the
    ORM's: `child` gets its id from the insert and is never flushed."""
    connection = db.connection()
    retire = update(RefreshToken).where(RefreshToken.id == token.id, RefreshToken.used_at.is_(None)).values(used_at=now)
    touch = update(AuthSession).values(last_used_at=now)
    columns = ("session_id", "jti_hash", "parent_id", "issued_at", "expires_at")
    table = RefreshToken.__table__
    if connection.dialect.name == "postgresql":
        # The session is touched only once the token is retired (its row locked), in the
        # order of the statements below: two refreshes of one token never deadlock.
        retired = retire.returning(RefreshToken.id, RefreshToken.session_id).cte("retired")
        touched = touch.where(AuthSession.id == retired.c.session_id).cte("touched")
        values = [retired.c.id if c == "parent_id" else literal(getattr(child, c), table.c[c].type) for c in columns]
        store = insert(RefreshToken).from_select(columns, select(*values)).add_cte(touched)
        child_id = connection.execute(store.returning(RefreshToken.id)).scalar()
    else:
        if connection.execute(retire).rowcount != 1:
            return False
        connection.execute(touch.where(AuthSession.id == child.session_id))
        child_id = connection.execute(
            insert(RefreshToken).values({c: getattr(child, c) for c in columns}).returning(RefreshToken.id)
        ).scalar()
    if child_id is None:
        return False
    child.id = child_id
    return True


def _replayed(
    db: Session, token: RefreshToken | None, auth_session: AuthSession, jti: str, now: datetime
) -> sessions.Issued | None:
    """A retired token again: within the reuse interval, the session's current head (two
    tabs refreshing at once); later, pruned, or with no head to give, the session is revoked."""
    if token is not None and now - (token.used_at or now) <= settings.current().refresh_reuse_interval:
        head = _current_head(db, auth_session, jti)
        if head is not None:
            return head
    sessions.revoke(db, sessions.REUSE_DETECTED, now, AuthSession.id == auth_session.id)
    return None


def _current_head(db: Session, auth_session: AuthSession, jti: str) -> sessions.Issued | None:
    """Follow a retired token's descendants to the one not yet used."""
    for _ in range(_MAX_CHAIN_WALK):
        # Under JWT_SECRET_KEY, or a previous secret for a link minted before it changed.
        by_hash = {tokens.jti_hash(candidate): candidate for candidate in tokens.child_jti_candidates(jti)}
        child = db.scalar(select(RefreshToken).where(RefreshToken.jti_hash.in_(by_hash)))
        if child is None or child.session_id != auth_session.id:
            return None
        jti = by_hash[child.jti_hash]
        if child.used_at is None:
            return sessions.Issued(auth_session, child, jti)
    return None
