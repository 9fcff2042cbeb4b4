"""Refresh-token rotation: retire the token, mint its successor; a replay of a retired
token inside the reuse interval gets the session's current pair, a later one revokes the
session as stolen."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Executable, Select, bindparam, insert, select, update
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
    row = db.execute(_statements().token, {"token_hash": tokens.jti_hash(jti)}).one_or_none()
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

    On PostgreSQL that is one statement (`_Statements.rotate`), so one round trip instead
    of three; elsewhere (SQLite) three. Core statements, not the ORM's: `child` gets its id
    from the insert and is never flushed."""
    connection = db.connection()
    values = {"token_id": token.id, "now": now, "child_hash": child.jti_hash, "child_expires": child.expires_at}
    statements = _statements()
    if connection.dialect.name == "postgresql":
        child_id = connection.execute(statements.rotate, values).scalar()
    else:
        if connection.execute(statements.retire, values).rowcount != 1:
            return False
        connection.execute(statements.touch, {"sid": child.session_id, "now": now})
        child_id = connection.execute(statements.insert, {**values, "sid": child.session_id}).scalar()
    if child_id is None:
        return False
    child.id = child_id
    return True


@dataclass(frozen=True)
class _Statements:
    """The statements of a rotation, built once (with bound parameters): building and
    caching a statement anew for each refresh costs more than running it. No parameter
    is named after a column (SQLAlchemy would add it to an UPDATE's SET)."""

    token: Select[RefreshToken, AuthSession, User]  # by the hash of its jti, with its session and user
    retire: Executable  # token_id, now: the token retired if it is still unused
    touch: Executable  # sid, now: the session's last use
    insert: Executable  # the child: sid, child_hash, token_id (its parent), now, child_expires
    # PostgreSQL: retire, then insert the child from the row retired and touch its session,
    # in one statement (data-modifying WITH queries). The session is touched only once the
    # token is retired (its row locked): two refreshes of one token never deadlock.
    rotate: Executable


@cache
def _statements() -> _Statements:
    table = RefreshToken.__table__
    now = bindparam("now", type_=table.c.issued_at.type)
    retire = (
        update(RefreshToken)
        .where(RefreshToken.id == bindparam("token_id"), RefreshToken.used_at.is_(None))
        .values(used_at=now)
    )
    touch = update(AuthSession).values(last_used_at=now)
    columns = ("session_id", "jti_hash", "parent_id", "issued_at", "expires_at")
    child = {
        "jti_hash": bindparam("child_hash", type_=table.c.jti_hash.type),
        "issued_at": now,
        "expires_at": bindparam("child_expires", type_=table.c.expires_at.type),
    }
    retired = retire.returning(RefreshToken.id, RefreshToken.session_id).cte("retired")
    from_retired = select(retired.c.session_id, child["jti_hash"], retired.c.id, now, child["expires_at"])
    touched = touch.where(AuthSession.id == retired.c.session_id).cte("touched")
    return _Statements(
        token=select(RefreshToken, AuthSession, User)
        .join(AuthSession, RefreshToken.session_id == AuthSession.id)
        .join(User, AuthSession.user_id == User.id)
        .where(RefreshToken.jti_hash == bindparam("token_hash")),
        retire=retire,
        touch=touch.where(AuthSession.id == bindparam("sid")),
        insert=insert(RefreshToken)
        .values(session_id=bindparam("sid"), parent_id=bindparam("token_id"), **child)
        .returning(RefreshToken.id),
        rotate=insert(RefreshToken).from_select(columns, from_retired).add_cte(touched).returning(RefreshToken.id),
    )


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
