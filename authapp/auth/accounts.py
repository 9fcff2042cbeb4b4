"""Accounts: register, create (operators), look up, activate and deactivate, and replace a
password (the user's own change, or an operator's)."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from .. import audit, clock, settings
from ..database import unit_of_work
from ..errors import NotFound, UserAlreadyExists
from ..models import AuthSession, User
from . import passwords, sessions
from .context import Client


def user_query(*, email: str | None = None, username: str | None = None) -> Select[Any]:
    """A user by email or by username, both without regard to case (an index on each)."""
    if email is not None:
        return select(User).where(func.lower(User.email) == email.strip().lower())
    return select(User).where(func.lower(User.username) == (username or "").strip().lower())


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


# -- Creating accounts --------------------------------------------------------------------


def create(
    email: str, username: str, password: str, client: Client | None = None
) -> tuple[User, sessions.Issued | None]:
    """Create a user, and start its first session when `client` is given (a registration);
    an operator's account starts none. USER_ALREADY_EXISTS when the email or username is
    taken, also when another registration commits first."""
    with unit_of_work() as db:
        taken = db.scalar(
            select(User.id).where(
                or_(func.lower(User.email) == email.lower(), func.lower(User.username) == username.lower())
            )
        )
    if taken is not None:
        raise UserAlreadyExists()

    hashed = passwords.hash_password(password, settings.current().bcrypt_rounds)
    now = clock.now()
    user = User(email=email, username=username, hashed_password=hashed, created_at=now, updated_at=now)
    issued = None
    try:
        with unit_of_work() as db:
            db.add(user)
            db.flush()
            if client is not None:
                issued = sessions.start(db, user.id, now, client)
    except IntegrityError:
        # Another registration of the same email or username committed first.
        raise UserAlreadyExists() from None
    if issued is not None:
        audit.record(audit.REGISTER, user_id=user.id, sid=issued.session.id)
    else:
        audit.record(audit.USER_CREATED, user_id=user.id, by="operator")
    return user, issued


def register(email: str, username: str, password: str, client: Client) -> dict[str, Any]:
    """Create an account and start its first session."""
    user, issued = create(email, username, password, client)
    return cast(sessions.Issued, issued).pair(user)


# -- Activation and passwords -------------------------------------------------------------


def set_active(user: User, active: bool) -> int:
    """Activate or deactivate a user; deactivation also ends every session."""
    now = clock.now()
    revoked = 0
    with unit_of_work() as db:
        db.execute(update(User).where(User.id == user.id).values(is_active=active, updated_at=now))
        if not active:
            revoked = sessions.revoke(db, sessions.USER_DEACTIVATED, now, AuthSession.user_id == user.id)
    user.is_active = active
    audit.record(audit.USER_ACTIVATED if active else audit.USER_DEACTIVATED, user_id=user.id, sessions_revoked=revoked)
    return revoked


def replace_password(user: Any, password: str, client: Client | None = None) -> tuple[int, sessions.Issued | None]:
    """Store a new password and end every session of the user; with `client` (the user's
    own change) start a new session in the same transaction. Returns (revoked, issued)."""
    hashed = passwords.hash_password(password, settings.current().bcrypt_rounds)
    now = clock.now()
    issued = None
    with unit_of_work() as db:
        db.execute(update(User).where(User.id == user.id).values(hashed_password=hashed, updated_at=now))
        revoked = sessions.revoke(db, sessions.PASSWORD_CHANGED, now, AuthSession.user_id == user.id)
        if client is not None:
            issued = sessions.start(db, user.id, now, client)
    if issued is not None:
        audit.record(audit.PASSWORD_CHANGED, user_id=user.id, sid=issued.session.id, sessions_revoked=revoked)
    else:
        audit.record(audit.PASSWORD_CHANGED, user_id=user.id, sessions_revoked=revoked, by="operator")
    return revoked, issued
