"""Who is calling: the client as a view saw it, and the request's auth context.

A protected request's token check produces one `AuthContext`, which views receive as the
`auth` argument and pass on to the flows; `g.auth` holds the same object for the request
log line. Nothing else about the caller is kept in `g`.
"""

from __future__ import annotations

import re
from collections import namedtuple
from dataclasses import dataclass
from typing import Any

from .. import clock
from ..database import PreparedRead
from ..errors import InvalidToken, TokenExpired, TokenRevoked, UserInactive
from ..extensions import db
from ..models import Model
from . import keys


@dataclass(frozen=True, slots=True)
class Client:
    """The caller's address (as nginx saw it) and user agent; both unknown for operators."""

    ip: str | None = None
    user_agent: str | None = None


OPERATOR = Client()


@dataclass(frozen=True, slots=True)
class AuthContext:
    """A live session's access token, checked: its user, its session, its assurance level.

    The level is the session row's, not the token's claim: enabling MFA raises the level
    of the session it happens in at once, while that session's access token, minted
    before, still says aal1 until its next refresh."""

    user_id: int
    session_id: str
    # The user's public columns (PUBLIC_USER_COLUMNS), read-only; never the password hash.
    user: Any
    aal: str = "aal1"
    amr: tuple[str, ...] = ("pwd",)


# The one statement of every protected request: the user's public columns and the
# session's state, by primary keys. Not the password hash: a flow that needs it reads it
# itself. A column the auth context needs is one more line of the select list (its
# type comes from the models, the row's field takes its name, or its alias after AS:
# `mfa_enabled_at` is the user's MFA row's `enabled_at`, as a User has it). Prepared once per
# PostgreSQL connection (database.PreparedRead), plain on SQLite.
SESSION_CHECK_SQL = """
SELECT users.id,
       users.username,
       users.email,
       users.is_active,
       users.created_at,
       users.last_login,
       users.email_verified_at,
       mfa_totp.enabled_at AS mfa_enabled_at,
       sessions.revoked_at,
       sessions.expires_at,
       sessions.aal,
       sessions.amr
  FROM sessions JOIN users ON users.id = sessions.user_id
       LEFT JOIN mfa_totp ON mfa_totp.user_id = users.id
 WHERE sessions.id = :sid AND users.id = :user_id
"""
# (table, column, the row's field name) of each line of the select list.
_SELECTED = [
    (table, column, alias or column)
    for table, column, alias in re.findall(r"(\w+)\.(\w+)(?: AS (\w+))?", SESSION_CHECK_SQL.split("FROM", 1)[0])
]
PUBLIC_USER_COLUMNS = tuple(name for table, name, _field in _SELECTED if table == "users")
# The row as views and flows see it: read-only, by attribute (`row.is_active`).
# (Its fields come from the statement's text, so type checkers see it as Any.)
SessionRow: Any = namedtuple("SessionRow", [field for _table, _column, field in _SELECTED])  # type: ignore[misc]
_SESSION_CHECK = PreparedRead("authapp_session_check", SESSION_CHECK_SQL)
_COLUMN_TYPES = [Model.metadata.tables[table].c[name].type for table, name, _field in _SELECTED]
_converters: dict[str, list[tuple[int, Any]]] = {}


def _row_of(values: Any, dialect: Any) -> Any:
    """A row as the models' column types give it (UTC datetimes on both backends): each
    value that is not NULL through its column's result processor, where it has one."""
    converters = _converters.get(dialect.name)
    if converters is None:
        processors = [t.dialect_impl(dialect).result_processor(dialect, None) for t in _COLUMN_TYPES]
        converters = _converters[dialect.name] = [(i, c) for i, c in enumerate(processors) if c is not None]
    row = list(values)
    for index, convert in converters:
        value = row[index]
        if value is not None:
            row[index] = convert(value)
    return SessionRow._make(row)


def read_session(sid: str, user_id: int) -> Any:
    """The session check's row, or None when no session `sid` of user `user_id` exists
    (through the breaker, outside any transaction)."""
    engine = db.engine
    rows = _SESSION_CHECK.fetch(engine, {"sid": sid, "user_id": user_id})
    return _row_of(rows[0], engine.dialect) if rows else None


def user_id_of(claims: dict[str, Any]) -> int:
    """The user id of a token's `sub`, or INVALID_TOKEN."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not keys.is_user_id(sub):  # int() would take " 1", "+1", "1_0", "١"
        raise InvalidToken()
    return int(sub)


def authenticate(claims: dict[str, Any]) -> AuthContext:
    """The context of an access token that `keys.decode_access_token` accepted (its `sub`
    a user id, its `sid` a string), when its session is live, read in one indexed query
    (so that a revocation takes effect at once); or the error that says why not."""
    sid, user_id = claims["sid"], int(claims["sub"])
    row = read_session(sid, user_id)
    if row is None:
        raise InvalidToken()
    if not row.is_active:
        raise UserInactive()
    if row.expires_at <= clock.now():
        raise TokenExpired()
    if row.revoked_at is not None:
        raise TokenRevoked()
    return AuthContext(user_id=user_id, session_id=sid, user=row, aal=row.aal, amr=tuple(row.amr.split()))
