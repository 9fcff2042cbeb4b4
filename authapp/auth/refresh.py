"""Refresh-token rotation: retire the token, mint its successor; a replay of a retired
token inside the reuse interval gets the session's current pair, a later one revokes the
session as stolen."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Executable, Select, bindparam, insert, select, update

from .. import audit, clock, settings
from ..database import core_unit_of_work
from ..errors import InvalidToken, TokenExpired, TokenRevoked, UserInactive
from ..models import AuthSession, MfaTotp, RefreshToken, User
from . import sessions, tokens
from .context import PUBLIC_USER_COLUMNS, user_id_of

# How far a replayed token's chain is followed to its current head.
_MAX_CHAIN_WALK = 100


# What a refresh reads of its token, session and user: plain rows, not ORM objects. Read
# through the ORM, the three objects (their loading, identity map and expiry at commit)
# cost more than the statement; the rotation writes through Core statements anyway.
class _Token(NamedTuple):
    id: int
    used_at: datetime | None


class _Session(NamedTuple):
    """What mint_pair and the checks read of a session."""

    id: str
    user_id: int
    expires_at: datetime
    revoked_at: datetime | None
    aal: str
    amr: str


_SESSION_COLUMNS = _Session._fields
# The user as the session check has it (the public columns, never the password hash):
# what the TokenResponse shows. (Its fields come from that statement's text.)
_User: Any = namedtuple("_User", (*PUBLIC_USER_COLUMNS, "mfa_enabled_at"))  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class _Child:
    """A rotation's new refresh token, as its INSERT stored it: what its pair is minted from."""

    id: int
    session_id: str
    jti_hash: str
    issued_at: datetime
    expires_at: datetime


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
    with core_unit_of_work() as db:
        token, auth_session, user = _live_token(db, jti, sid, user_id_of(claims), now)
        issued = None
        if token is not None:
            issued, token = _rotate(db, token, auth_session, jti, now)
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
    connection: Connection, jti: str, sid: str, user_id: int, now: datetime
) -> tuple[_Token | None, _Session, Any]:
    """The token's row (None when it was pruned) with its session and user, or the error
    that says why it is dead."""
    statements = _statements()
    row = connection.execute(statements.token, {"token_hash": tokens.jti_hash(jti)}).first()
    token: _Token | None = None
    if row is not None:
        token, values = _Token._make(row[:2]), row[2:]
    else:  # its session was deleted, or it was retired and pruned
        session_row = connection.execute(statements.session, {"sid": sid}).first()
        if session_row is None:
            raise InvalidToken()
        values = tuple(session_row)
    split = len(_SESSION_COLUMNS)
    auth_session, user = _Session._make(values[:split]), cast(Any, _User)._make(values[split:])
    if auth_session.id != sid or user.id != user_id:
        raise InvalidToken()
    if not user.is_active:
        raise UserInactive()
    if auth_session.revoked_at is not None:
        raise TokenRevoked()
    if auth_session.expires_at <= now:
        raise TokenExpired()
    return token, auth_session, user


def _rotate(db: Connection, token: _Token, auth_session: _Session, jti: str, now: datetime) -> tuple[Any, _Token]:
    """Retire an unused token and add its successor: (the successor's Issued, or None when
    the token was retired already; the token, with `used_at` telling when if so)."""
    if token.used_at is None:
        child_jti = tokens.child_jti(jti)
        # It never outlives the session (as sessions.refresh_token_row).
        expires = min(now + settings.current().refresh_token_lifetime, auth_session.expires_at)
        child = _retire(db, token, auth_session.id, tokens.jti_hash(child_jti), expires, now)
        if child is not None:
            return sessions.Issued(auth_session, child, child_jti), token  # type: ignore[arg-type]  # its row
        # A concurrent refresh of the same token retired it first.
        token = token._replace(used_at=db.scalar(select(RefreshToken.used_at).where(RefreshToken.id == token.id)))
    return None, token


def _retire(
    connection: Connection, token: _Token, sid: str, child_hash: str, child_expires: datetime, now: datetime
) -> Any:
    """Retire `token` if it is still unused (`used_at IS NULL`: of two concurrent refreshes
    only one retires it), store its successor (`parent_id` is unique besides) and mark the
    session used; the successor (a `_Child`), or None when the token was retired already.

    On PostgreSQL that is one statement (`_Statements.rotate`), so one round trip instead
    of three; elsewhere (SQLite) three. Core statements, not the ORM's."""
    values = {"token_id": token.id, "now": now, "child_hash": child_hash, "child_expires": child_expires}
    statements = _statements()
    if connection.dialect.name == "postgresql":
        child_id = connection.execute(statements.rotate, values).scalar()
    else:
        if connection.execute(statements.retire, values).rowcount != 1:
            return None
        connection.execute(statements.touch, {"sid": sid, "now": now})
        child_id = connection.execute(statements.insert, {**values, "sid": sid}).scalar()
    if child_id is None:
        return None
    return _Child(child_id, sid, child_hash, now, child_expires)


@dataclass(frozen=True)
class _Statements:
    """The statements of a rotation, built once (with bound parameters): building and
    caching a statement anew for each refresh costs more than running it. No parameter
    is named after a column (SQLAlchemy would add it to an UPDATE's SET)."""

    # By the hash of its jti: the token's `_Token`, its session's `_Session` and its user's
    # `_User` columns, in one row.
    token: Select[Any]
    session: Select[Any]  # sid: the `_Session` and `_User` columns of a session without its token
    # A token's columns (`_Child`'s and used_at), to be filtered by its jti's hash.
    child: Select[int, str, str, datetime, datetime, datetime | None]
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
    session_and_user = (
        *(AuthSession.__table__.c[name] for name in _SESSION_COLUMNS),
        *(User.__table__.c[name] for name in PUBLIC_USER_COLUMNS),
        MfaTotp.enabled_at.label("mfa_enabled_at"),
    )
    users = AuthSession.__table__.join(User.__table__, AuthSession.user_id == User.id).outerjoin(
        MfaTotp.__table__, MfaTotp.user_id == User.id
    )
    return _Statements(
        token=select(RefreshToken.id, RefreshToken.used_at, *session_and_user)
        .select_from(RefreshToken.__table__.join(users, RefreshToken.session_id == AuthSession.id))
        .where(RefreshToken.jti_hash == bindparam("token_hash")),
        session=select(*session_and_user).select_from(users).where(AuthSession.id == bindparam("sid")),
        child=select(
            RefreshToken.id,
            RefreshToken.session_id,
            RefreshToken.jti_hash,
            RefreshToken.issued_at,
            RefreshToken.expires_at,
            RefreshToken.used_at,
        ),
        retire=retire,
        touch=touch.where(AuthSession.id == bindparam("sid")),
        insert=insert(RefreshToken)
        .values(session_id=bindparam("sid"), parent_id=bindparam("token_id"), **child)
        .returning(RefreshToken.id),
        rotate=insert(RefreshToken).from_select(columns, from_retired).add_cte(touched).returning(RefreshToken.id),
    )


def _replayed(
    db: Connection, token: _Token | None, auth_session: Any, jti: str, now: datetime
) -> sessions.Issued | None:
    """A retired token again: within the reuse interval, the session's current head (two
    tabs refreshing at once); later, pruned, or with no head to give, the session is revoked."""
    if token is not None and now - (token.used_at or now) <= settings.current().refresh_reuse_interval:
        head = _current_head(db, auth_session, jti)
        if head is not None:
            return head
    sessions.revoke(db, sessions.REUSE_DETECTED, now, AuthSession.id == auth_session.id)
    return None


def _current_head(db: Connection, auth_session: Any, jti: str) -> sessions.Issued | None:
    """Follow a retired token's descendants to the one not yet used."""
    for _ in range(_MAX_CHAIN_WALK):
        # Under JWT_SECRET_KEY, or a previous secret for a link minted before it changed.
        by_hash = {tokens.jti_hash(candidate): candidate for candidate in tokens.child_jti_candidates(jti)}
        child = db.execute(_statements().child.where(RefreshToken.jti_hash.in_(by_hash))).first()
        if child is None or child.session_id != auth_session.id:
            return None
        jti = by_hash[child.jti_hash]
        if child.used_at is None:
            return sessions.Issued(auth_session, child, jti)  # type: ignore[arg-type]  # its row
    return None
