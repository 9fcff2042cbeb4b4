"""Who is calling: the client as a view saw it, and the request's auth context.

A protected request's token check produces one `AuthContext`, which views receive as the
`auth` argument and pass on to the flows; `g.auth` holds the same object for the request
log line. Nothing else about the caller is kept in `g`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select

from .. import clock
from ..database import autocommit_read
from ..errors import InvalidToken, TokenExpired, TokenRevoked, UserInactive
from ..models import AuthSession, MfaTotp, User
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


# The user's public columns and the session's state, by primary keys: the one statement of
# every protected request. A Core select of columns (no ORM entity to build and track) is
# the cheapest way there. Not the password hash: a flow that needs it reads it itself.
# `mfa_enabled_at` comes from the user's MFA row (by its primary key), as a User has it.
PUBLIC_USER_COLUMNS = ("id", "username", "email", "is_active", "created_at", "last_login", "email_verified_at")
_SESSION_CHECK = (
    select(
        *(User.__table__.c[name] for name in PUBLIC_USER_COLUMNS),
        MfaTotp.enabled_at.label("mfa_enabled_at"),
        AuthSession.revoked_at,
        AuthSession.expires_at,
        AuthSession.aal,
        AuthSession.amr,
    )
    .join(AuthSession, AuthSession.user_id == User.id)
    .outerjoin(MfaTotp, MfaTotp.user_id == User.id)
    .where(AuthSession.id == bindparam("sid"), User.id == bindparam("user_id"))
)


def user_id_of(claims: dict[str, Any]) -> int:
    """The user id of a token's `sub`, or INVALID_TOKEN."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not keys.is_user_id(sub):  # int() would take " 1", "+1", "1_0", "١"
        raise InvalidToken()
    return int(sub)


def authenticate(claims: dict[str, Any]) -> AuthContext:
    """The context of a well-signed access token whose session is live, read in one
    indexed query (so that a revocation takes effect at once); or the error that says why not."""
    sid = claims.get("sid")
    if not isinstance(sid, str):
        raise InvalidToken()
    user_id = user_id_of(claims)
    with autocommit_read() as connection:
        row = connection.execute(_SESSION_CHECK, {"sid": sid, "user_id": user_id}).one_or_none()
    if row is None:
        raise InvalidToken()
    if not row.is_active:
        raise UserInactive()
    if row.expires_at <= clock.now():
        raise TokenExpired()
    if row.revoked_at is not None:
        raise TokenRevoked()
    return AuthContext(user_id=user_id, session_id=sid, user=row, aal=row.aal, amr=tuple(row.amr.split()))
