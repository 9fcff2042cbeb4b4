"""The authentication logic: accounts, sessions and their refresh tokens.

Services own their transactions (`unit_of_work`) and raise domain errors; bcrypt always
runs outside a transaction so that no database connection waits on it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app, has_request_context, request
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit, ratelimit
from ..database import unit_of_work
from ..errors import (
    AppError,
    InvalidCredentials,
    InvalidToken,
    NotFound,
    TokenExpired,
    TokenRevoked,
    UserAlreadyExists,
    UserInactive,
    ValidationFailed,
)
from ..models import AuthSession, RefreshToken, User
from . import passwords, tokens

# Why a session ended, as stored in sessions.revoked_reason.
LOGOUT = "logout"
LOGOUT_ALL = "logout_all"
PASSWORD_CHANGED = "password_changed"
SESSION_DELETED = "session_deleted"
REUSE_DETECTED = "refresh_token_reuse"
ADMIN = "admin"
USER_DEACTIVATED = "user_deactivated"

# How far a replayed token's chain is followed to its current head.
_MAX_CHAIN_WALK = 100


def utcnow() -> datetime:
    # Whole seconds: JWT times are whole seconds, and a pair is re-minted from these values.
    return datetime.now(UTC).replace(microsecond=0)


def _config(name: str) -> Any:
    return current_app.config[name]


def _rounds() -> int:
    return _config("BCRYPT_ROUNDS")


def user_query(*, email: str | None = None, username: str | None = None):
    """A user by email or by username, both without regard to case (an index on each)."""
    if email is not None:
        return select(User).where(func.lower(User.email) == email.strip().lower())
    return select(User).where(func.lower(User.username) == (username or "").strip().lower())


# -- Sessions -----------------------------------------------------------------------------


@dataclass
class _Issued:
    session: AuthSession
    refresh: RefreshToken
    jti: str


def _start_session(db: Session, user_id: int, now: datetime) -> _Issued:
    """Add a session and its first refresh token to the unit of work."""
    ip = user_agent = None
    if has_request_context():
        ip = request.remote_addr
        user_agent = (request.user_agent.string or "")[:255] or None
    auth_session = AuthSession(
        id=str(uuid.uuid4()),
        user_id=user_id,
        created_at=now,
        last_used_at=now,
        expires_at=now + timedelta(days=_config("SESSION_MAX_LIFETIME_DAYS")),
        ip=ip,
        user_agent=user_agent,
    )
    db.add(auth_session)
    return _Issued(auth_session, *_new_refresh_token(db, auth_session, tokens.new_jti(), None, now))


def _new_refresh_token(
    db: Session, auth_session: AuthSession, jti: str, parent_id: int | None, now: datetime
) -> tuple[RefreshToken, str]:
    expires = min(now + _config("JWT_REFRESH_TOKEN_EXPIRES"), auth_session.expires_at)
    refresh = RefreshToken(
        session_id=auth_session.id,
        jti_hash=tokens.jti_hash(jti),
        parent_id=parent_id,
        issued_at=now,
        expires_at=expires,
    )
    db.add(refresh)
    return refresh, jti


def _revoke(db: Session, reason: str, now: datetime, *conditions) -> int:
    """Revoke the live sessions matching `conditions`; returns how many."""
    result = db.execute(
        update(AuthSession)
        .where(AuthSession.revoked_at.is_(None), *conditions)
        .values(revoked_at=now, revoked_reason=reason)
    )
    return result.rowcount


def _pair(user: User, issued: _Issued) -> dict[str, Any]:
    return tokens.mint_pair(user, issued.session, issued.refresh, issued.jti)


# -- Accounts -----------------------------------------------------------------------------


def register(email: str, username: str, password: str) -> dict[str, Any]:
    """Create a user and start its first session."""
    with unit_of_work() as db:
        taken = db.scalar(
            select(User.id).where(
                or_(func.lower(User.email) == email.lower(), func.lower(User.username) == username.lower())
            )
        )
    if taken is not None:
        raise UserAlreadyExists()

    hashed = passwords.hash_password(password, _rounds())
    now = utcnow()
    user = User(email=email, username=username, hashed_password=hashed, created_at=now, updated_at=now)
    try:
        with unit_of_work() as db:
            db.add(user)
            db.flush()
            issued = _start_session(db, user.id, now)
    except IntegrityError:
        # Another registration of the same email or username committed first.
        raise UserAlreadyExists() from None
    audit.record(audit.REGISTER, user_id=user.id, sid=issued.session.id)
    return _pair(user, issued)


def login(password: str, email: str | None = None, username: str | None = None) -> dict[str, Any]:
    """Check credentials and start a session; every failure looks and costs the same."""
    with unit_of_work() as db:
        user = db.scalar(user_query(email=email, username=username))
    account = ratelimit.account_key(user.id if user else None, email if email is not None else username or "")
    _count_attempt(account, user.id if user else None)

    if user is None:
        # Same bcrypt work as a wrong password, so timing does not reveal the account.
        passwords.verify_password(password, passwords.dummy_hash(_rounds()))
        reason = "unknown_user"
    elif not passwords.verify_password(password, user.hashed_password):
        reason = "wrong_password"
    elif not user.is_active:
        reason = "inactive_user"
    else:
        reason = None
    if reason is not None:
        audit.record(audit.LOGIN_FAILURE, user_id=user.id if user else None, reason=reason)
        raise InvalidCredentials()
    ratelimit.clear_failures(account)

    now = utcnow()
    values: dict[str, Any] = {"last_login": now}
    if passwords.needs_rehash(user.hashed_password, _rounds()):
        values["hashed_password"] = passwords.hash_password(password, _rounds())
        values["updated_at"] = now
    with unit_of_work() as db:
        db.execute(update(User).where(User.id == user.id).values(**values))
        issued = _start_session(db, user.id, now)
    user.last_login = now
    audit.record(audit.LOGIN_SUCCESS, user_id=user.id, sid=issued.session.id)
    return _pair(user, issued)


def _count_attempt(account: str, user_id: int | None) -> None:
    try:
        ratelimit.count_attempt(account)
    except AppError:
        audit.record(audit.LOGIN_LOCKED, user_id=user_id)
        raise


def change_password(user: User, sid: str, current_password: str, new_password: str) -> dict[str, Any]:
    """Replace the password, end every session of the user and start a new one.

    Guesses of the current password count against the account like failed logins, so a
    stolen access token cannot be used to guess it without limit.
    """
    account = ratelimit.account_key(user.id, "")
    _count_attempt(account, user.id)
    with unit_of_work() as db:  # the request's user row carries no hash (tokens._SESSION_CHECK)
        stored = db.scalar(select(User.hashed_password).where(User.id == user.id))
    if stored is None or not passwords.verify_password(current_password, stored):
        audit.record(audit.PASSWORD_CHANGE_FAILED, user_id=user.id, sid=sid, reason="wrong_password")
        raise InvalidCredentials()
    ratelimit.clear_failures(account)
    if passwords.normalize(new_password) == passwords.normalize(current_password):
        raise ValidationFailed(errors={"new_password": ["New password must differ from the current one."]})
    hashed = passwords.hash_password(new_password, _rounds())
    now = utcnow()
    with unit_of_work() as db:
        db.execute(update(User).where(User.id == user.id).values(hashed_password=hashed, updated_at=now))
        revoked = _revoke(db, PASSWORD_CHANGED, now, AuthSession.user_id == user.id)
        issued = _start_session(db, user.id, now)
    audit.record(audit.PASSWORD_CHANGED, user_id=user.id, sid=issued.session.id, sessions_revoked=revoked)
    return _pair(user, issued)


# -- Refresh ------------------------------------------------------------------------------


def refresh(refresh_token: str) -> dict[str, Any]:
    """Rotate a refresh token: retire it and return a new pair in the same session.

    The retirement is one conditional UPDATE (`used_at IS NULL`), so of two concurrent
    refreshes of one token only one mints a child (and `parent_id` is unique besides).
    A retired token presented again within REFRESH_TOKEN_REUSE_INTERVAL gets the
    session's current pair; later, it revokes the session as stolen.
    """
    claims = tokens.decode_refresh_token(refresh_token)
    jti, sid = claims.get("jti"), claims["sid"]
    if not isinstance(jti, str):
        raise InvalidToken()
    now = utcnow()
    stolen = replayed = False
    with unit_of_work() as db:
        row = db.execute(
            select(RefreshToken, AuthSession, User)
            .join(AuthSession, RefreshToken.session_id == AuthSession.id)
            .join(User, AuthSession.user_id == User.id)
            .where(RefreshToken.jti_hash == tokens.jti_hash(jti))
        ).one_or_none()
        if row is None:
            raise InvalidToken()
        token, auth_session, user = row
        if auth_session.id != sid or user.id != tokens.user_id_of(claims):
            raise InvalidToken()
        if not user.is_active:
            raise UserInactive()
        if auth_session.revoked_at is not None:
            raise TokenRevoked()
        if auth_session.expires_at <= now:
            raise TokenExpired()

        issued: _Issued | None = None
        if token.used_at is None:
            retired = db.execute(
                update(RefreshToken)
                .where(RefreshToken.id == token.id, RefreshToken.used_at.is_(None))
                .values(used_at=now)
            ).rowcount
            if retired == 1:
                child, child_jti = _new_refresh_token(db, auth_session, tokens.child_jti(jti), token.id, now)
                db.execute(update(AuthSession).where(AuthSession.id == auth_session.id).values(last_used_at=now))
                issued = _Issued(auth_session, child, child_jti)
            else:  # a concurrent refresh of the same token retired it first
                token.used_at = db.scalar(select(RefreshToken.used_at).where(RefreshToken.id == token.id))

        if issued is None:
            used_at = token.used_at or now
            if now - used_at <= timedelta(seconds=_config("REFRESH_TOKEN_REUSE_INTERVAL")):
                issued = _current_head(db, auth_session, jti)
                replayed = issued is not None
            if issued is None:
                _revoke(db, REUSE_DETECTED, now, AuthSession.id == auth_session.id)
                stolen = True

    if stolen:
        audit.record(audit.REUSE_DETECTED, user_id=user.id, sid=auth_session.id)
        raise TokenRevoked()
    audit.record(audit.REFRESH_REPLAY if replayed else audit.REFRESH, user_id=user.id, sid=auth_session.id)
    return _pair(user, issued)


def _current_head(db: Session, auth_session: AuthSession, jti: str) -> _Issued | None:
    """Follow a retired token's descendants to the one not yet used."""
    for _ in range(_MAX_CHAIN_WALK):
        # Under JWT_SECRET_KEY, or a previous secret for a link minted before it changed.
        by_hash = {tokens.jti_hash(candidate): candidate for candidate in tokens.child_jti_candidates(jti)}
        child = db.scalar(select(RefreshToken).where(RefreshToken.jti_hash.in_(by_hash)))
        if child is None or child.session_id != auth_session.id:
            return None
        jti = by_hash[child.jti_hash]
        if child.used_at is None:
            return _Issued(auth_session, child, jti)
    return None


# -- Ending sessions ----------------------------------------------------------------------


def logout(user: User, sid: str, refresh_token: str | None = None) -> None:
    """End the access token's session, and the session of `refresh_token` if it is one of
    the same user's. A refresh token that is not (garbage, another user's) is ignored:
    logging out always logs the caller out."""
    sids = {sid}
    if refresh_token is not None:
        try:
            claims = tokens.decode_refresh_token(refresh_token, allow_expired=True)
            if tokens.user_id_of(claims) == user.id:
                sids.add(claims["sid"])
            else:
                audit.record(audit.LOGOUT_TOKEN_IGNORED, user_id=user.id, sid=sid, reason="another_user")
        except AppError:
            audit.record(audit.LOGOUT_TOKEN_IGNORED, user_id=user.id, sid=sid, reason="invalid_token")
    now = utcnow()
    with unit_of_work() as db:
        _revoke(db, LOGOUT, now, AuthSession.user_id == user.id, AuthSession.id.in_(sids))
    for ended in sorted(sids):
        audit.record(audit.LOGOUT, user_id=user.id, sid=ended)


def logout_all(user: User, sid: str | None = None) -> int:
    """End every session of the user; returns how many were live."""
    with unit_of_work() as db:
        count = _revoke(db, LOGOUT_ALL, utcnow(), AuthSession.user_id == user.id)
    audit.record(audit.LOGOUT_ALL, user_id=user.id, sid=sid, sessions_revoked=count)
    return count


def list_sessions(user: User, current_sid: str | None) -> list[dict[str, Any]]:
    """The user's live sessions, newest first."""
    now = utcnow()
    with unit_of_work() as db:
        rows = db.scalars(
            select(AuthSession)
            .where(AuthSession.user_id == user.id, AuthSession.revoked_at.is_(None), AuthSession.expires_at > now)
            .order_by(AuthSession.created_at.desc(), AuthSession.id)
        ).all()
    return [
        {
            "id": s.id,
            "created_at": s.created_at,
            "last_used_at": s.last_used_at,
            "expires_at": s.expires_at,
            "ip": s.ip,
            "user_agent": s.user_agent,
            "current": s.id == current_sid,
        }
        for s in rows
    ]


def delete_session(user: User, session_id: str, current_sid: str | None = None) -> None:
    """Revoke one of the user's live sessions; another user's or an unknown id is 404."""
    now = utcnow()
    with unit_of_work() as db:
        count = _revoke(
            db,
            SESSION_DELETED,
            now,
            AuthSession.id == session_id,
            AuthSession.user_id == user.id,
            AuthSession.expires_at > now,
        )
    if count == 0:
        raise NotFound("Session not found")
    audit.record(audit.SESSION_REVOKED, user_id=user.id, sid=session_id, by_sid=current_sid)


# -- Operators ----------------------------------------------------------------------------


def find_user(identifier: str) -> User:
    """The user named by id, email or username (in that order); NotFound otherwise."""
    identifier = identifier.strip()
    with unit_of_work() as db:
        user = db.get(User, int(identifier)) if identifier.isdigit() else None
        if user is None:
            by_email = "@" in identifier
            user = db.scalar(user_query(email=identifier if by_email else None, username=identifier))
    if user is None:
        raise NotFound(f"No user matches {identifier!r}")
    return user


def list_users(*, include_inactive: bool = True) -> list[User]:
    with unit_of_work() as db:
        query = select(User).order_by(User.id)
        if not include_inactive:
            query = query.where(User.is_active.is_(True))
        return list(db.scalars(query).all())


def create_user(email: str, username: str, password: str) -> User:
    """Create a user without starting a session (for operators)."""
    hashed = passwords.hash_password(password, _rounds())
    now = utcnow()
    user = User(email=email, username=username, hashed_password=hashed, created_at=now, updated_at=now)
    try:
        with unit_of_work() as db:
            db.add(user)
    except IntegrityError:
        raise UserAlreadyExists() from None
    audit.record(audit.USER_CREATED, user_id=user.id, by="operator")
    return user


def set_active(user: User, active: bool) -> int:
    """Activate or deactivate a user; deactivation also ends every session."""
    now = utcnow()
    revoked = 0
    with unit_of_work() as db:
        db.execute(update(User).where(User.id == user.id).values(is_active=active, updated_at=now))
        if not active:
            revoked = _revoke(db, USER_DEACTIVATED, now, AuthSession.user_id == user.id)
    user.is_active = active
    audit.record(audit.USER_ACTIVATED if active else audit.USER_DEACTIVATED, user_id=user.id, sessions_revoked=revoked)
    return revoked


def set_password(user: User, password: str) -> int:
    """Replace a user's password (operators) and end every session; returns how many."""
    hashed = passwords.hash_password(password, _rounds())
    now = utcnow()
    with unit_of_work() as db:
        db.execute(update(User).where(User.id == user.id).values(hashed_password=hashed, updated_at=now))
        revoked = _revoke(db, PASSWORD_CHANGED, now, AuthSession.user_id == user.id)
    audit.record(audit.PASSWORD_CHANGED, user_id=user.id, sessions_revoked=revoked, by="operator")
    return revoked


def revoke_all(user: User) -> int:
    """End every live session of a user (operators); returns how many."""
    with unit_of_work() as db:
        revoked = _revoke(db, ADMIN, utcnow(), AuthSession.user_id == user.id)
    audit.record(audit.LOGOUT_ALL, user_id=user.id, sessions_revoked=revoked, by="operator")
    return revoked


def prune(revoked_older_than: timedelta) -> tuple[int, int]:
    """Delete expired sessions, sessions revoked longer ago than `revoked_older_than`, and
    expired refresh tokens: rows no token can use any more. Returns (sessions, tokens)."""
    now = utcnow()
    with unit_of_work() as db:
        sessions = db.execute(
            delete(AuthSession).where(
                or_(AuthSession.expires_at <= now, AuthSession.revoked_at <= now - revoked_older_than)
            )
        ).rowcount
        refresh_tokens = db.execute(delete(RefreshToken).where(RefreshToken.expires_at <= now)).rowcount
    return sessions, refresh_tokens
