"""Sessions: start one, list them, end one or all, prune the dead ones.

A session is the chain of refresh tokens that rotation produces from one login
(`auth.refresh`). Ending a session takes effect at once for its access tokens too, since
every protected request reads the session (`auth.context.authenticate`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from .. import audit, clock, settings
from ..database import unit_of_work
from ..errors import AppError, NotFound
from ..models import AuthSession, RefreshToken
from . import tokens
from .context import AuthContext, Client, user_id_of

# Why a session ended, as stored in sessions.revoked_reason.
LOGOUT = "logout"
LOGOUT_ALL = "logout_all"
PASSWORD_CHANGED = "password_changed"
SESSION_DELETED = "session_deleted"
REUSE_DETECTED = "refresh_token_reuse"
ADMIN = "admin"
USER_DEACTIVATED = "user_deactivated"
SESSION_LIMIT = "session_limit"
MFA_ENABLED = "mfa_enabled"
MFA_DISABLED = "mfa_disabled"
MFA_RESET = "mfa_reset"

# Assurance levels (NIST SP 800-63B) and how a session was authenticated (RFC 8176).
AAL1, AAL2 = "aal1", "aal2"
PASSWORD_ONLY = ("pwd",)
SECOND_FACTOR = ("pwd", "otp")


@dataclass
class Issued:
    """A session's newest refresh token, and the `jti` its pair is minted from."""

    session: AuthSession
    refresh: RefreshToken  # or what a refresh read or stored of one (its issued_at, expires_at)
    jti: str
    ended: list[str] = field(default_factory=list)  # sessions ended to stay within the cap

    def record_ended(self) -> None:
        """Audit the sessions that starting this one ended (once it is committed)."""
        for ended in self.ended:
            audit.record(audit.SESSION_LIMIT, user_id=self.session.user_id, sid=ended, by_sid=self.session.id)

    def pair(self, user: Any) -> dict[str, Any]:
        """The TokenResponse of this refresh token (the same row always gives the same pair)."""
        return tokens.mint_pair(user, self.session, self.refresh, self.jti)


def start(
    db: Session | Connection,
    user_id: int,
    now: datetime,
    client: Client,
    *,
    aal: str = AAL1,
    amr: tuple[str, ...] = PASSWORD_ONLY,
    first: bool = False,
) -> Issued:
    """Store a session (at level `aal`, authenticated by `amr`) and its first refresh token
    in `db`'s transaction, ending the user's oldest live sessions when it would make more
    than SESSION_MAX_PER_USER (`first`: the user was created in this transaction, so it
    has none to end). Core statements, none of the ORM's flush: the rows it returns are
    the ones stored, not attached to any Session."""
    # Callers have written the user's row in this transaction (login and change-password
    # update it, register inserts it) and hold its lock: two logins of one user count the
    # live sessions one after the other.
    ended: list[str] = []
    if not first:
        beyond_cap = (
            select(AuthSession.id)
            .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None), AuthSession.expires_at > now)
            .order_by(AuthSession.created_at.desc(), AuthSession.id.desc())
            .offset(settings.current().session_max_per_user - 1)
        )
        ended = revoke_returning(db, SESSION_LIMIT, now, AuthSession.id.in_(beyond_cap.scalar_subquery()))
    auth_session = AuthSession(
        id=str(uuid.uuid4()),
        user_id=user_id,
        created_at=now,
        last_used_at=now,
        expires_at=now + settings.current().session_lifetime,
        revoked_at=None,
        revoked_reason=None,
        ip=client.ip,
        user_agent=client.user_agent,
        aal=aal,
        amr=" ".join(amr),
    )
    connection = _connection(db)
    connection.execute(insert(AuthSession).values(_columns(auth_session, AuthSession)))
    jti = tokens.new_jti()
    refresh = refresh_token_row(auth_session, jti, None, now)
    connection.execute(insert(RefreshToken).values(_columns(refresh, RefreshToken, skip=("id", "used_at"))))
    return Issued(auth_session, refresh, jti, ended)


def _connection(db: Session | Connection) -> Connection:
    """The connection of `db`'s transaction: a Core statement on it skips the ORM's
    per-statement work. A Session's pending objects are flushed first, so that what the
    statement refers to (the user a registration adds) is there."""
    if isinstance(db, Session):
        db.flush()
        return db.connection()
    return db


def _columns(row: Any, model: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of `row`'s columns (those in `skip` left to the database's defaults)."""
    return {column.key: getattr(row, column.key) for column in model.__table__.columns if column.key not in skip}


def refresh_token_row(auth_session: AuthSession, jti: str, parent_id: int | None, now: datetime) -> RefreshToken:
    """A refresh token of `auth_session`, not yet stored; it never outlives the session."""
    expires = min(now + settings.current().refresh_token_lifetime, auth_session.expires_at)
    return RefreshToken(
        session_id=auth_session.id,
        jti_hash=tokens.jti_hash(jti),
        parent_id=parent_id,
        issued_at=now,
        expires_at=expires,
    )


def _revoking(reason: str, now: datetime, *conditions: Any) -> Any:
    """The UPDATE that revokes the live sessions matching `conditions`."""
    return (
        update(AuthSession)
        .where(AuthSession.revoked_at.is_(None), *conditions)
        .values(revoked_at=now, revoked_reason=reason)
    )


def revoke(db: Session | Connection, reason: str, now: datetime, *conditions: Any) -> int:
    """Revoke the live sessions matching `conditions`; returns how many."""
    result = db.execute(_revoking(reason, now, *conditions))
    return result.rowcount  # type: ignore[attr-defined]  # a CursorResult for an UPDATE


def revoke_returning(db: Session | Connection, reason: str, now: datetime, *conditions: Any) -> list[str]:
    """`revoke`, in one statement that also returns the ids of the sessions it ended."""
    statement = _revoking(reason, now, *conditions).returning(AuthSession.id)
    return list(_connection(db).scalars(statement).all())


# -- Ending sessions ----------------------------------------------------------------------


def logout(auth: AuthContext, refresh_token: str | None = None) -> None:
    """End the access token's session, and the session of `refresh_token` if it is one of
    the same user's. A refresh token that is not (garbage, another user's) is ignored:
    logging out always logs the caller out."""
    sids = {auth.session_id}
    if refresh_token is not None:
        try:
            claims = tokens.decode_refresh_token(refresh_token, allow_expired=True)
            if user_id_of(claims) == auth.user_id:
                sids.add(claims["sid"])
            else:
                audit.record(
                    audit.LOGOUT_TOKEN_IGNORED, user_id=auth.user_id, sid=auth.session_id, reason="another_user"
                )
        except AppError:
            audit.record(audit.LOGOUT_TOKEN_IGNORED, user_id=auth.user_id, sid=auth.session_id, reason="invalid_token")
    with unit_of_work() as db:
        revoke(db, LOGOUT, clock.now(), AuthSession.user_id == auth.user_id, AuthSession.id.in_(sids))
    for ended in sorted(sids):
        audit.record(audit.LOGOUT, user_id=auth.user_id, sid=ended)


def end_all(user_id: int, reason: str, *, sid: str | None = None, by: str | None = None) -> int:
    """End every live session of a user (logout-all, or an operator); returns how many."""
    with unit_of_work() as db:
        count = revoke(db, reason, clock.now(), AuthSession.user_id == user_id)
    extra = {"by": by} if by else {}
    audit.record(audit.LOGOUT_ALL, user_id=user_id, sid=sid, sessions_revoked=count, **extra)
    return count


def delete_session(auth: AuthContext, session_id: str) -> None:
    """Revoke one of the user's live sessions; another user's or an unknown id is 404."""
    now = clock.now()
    with unit_of_work() as db:
        count = revoke(
            db,
            SESSION_DELETED,
            now,
            AuthSession.id == session_id,
            AuthSession.user_id == auth.user_id,
            AuthSession.expires_at > now,
        )
    if count == 0:
        raise NotFound("Session not found")
    audit.record(audit.SESSION_REVOKED, user_id=auth.user_id, sid=session_id, by_sid=auth.session_id)


# -- Listing and pruning ------------------------------------------------------------------


def list_live(auth: AuthContext) -> list[dict[str, Any]]:
    """The user's live sessions, newest first."""
    now = clock.now()
    with unit_of_work() as db:
        rows = db.scalars(
            select(AuthSession)
            .where(AuthSession.user_id == auth.user_id, AuthSession.revoked_at.is_(None), AuthSession.expires_at > now)
            .order_by(AuthSession.created_at.desc(), AuthSession.id)
            .limit(settings.current().session_max_per_user)
        ).all()
    return [
        {
            "id": s.id,
            "created_at": s.created_at,
            "last_used_at": s.last_used_at,
            "expires_at": s.expires_at,
            "ip": s.ip,
            "user_agent": s.user_agent,
            "aal": s.aal,
            "amr": s.amr.split(),
            "current": s.id == auth.session_id,
        }
        for s in rows
    ]


def prune(revoked_older_than: timedelta) -> tuple[int, int]:
    """Delete expired sessions, sessions revoked longer ago than `revoked_older_than`,
    expired refresh tokens, and refresh tokens retired longer ago than the reuse interval:
    what is left is each live session's current token and the tokens a replay within the
    interval walks. A pruned token presented again still revokes its session (`refresh`).
    Returns (sessions, tokens)."""
    now = clock.now()
    retired_before = now - settings.current().refresh_reuse_interval
    with unit_of_work() as db:
        sessions = db.execute(
            delete(AuthSession).where(
                or_(AuthSession.expires_at <= now, AuthSession.revoked_at <= now - revoked_older_than)
            )
        ).rowcount  # type: ignore[attr-defined]
        refresh_tokens = db.execute(
            delete(RefreshToken).where(or_(RefreshToken.expires_at <= now, RefreshToken.used_at <= retired_before))
        ).rowcount  # type: ignore[attr-defined]
    return sessions, refresh_tokens
