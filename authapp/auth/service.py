"""The authentication logic: register, login, refresh. Owns its transactions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import current_app, g
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from ..database import unit_of_work
from ..errors import InvalidCredentials, InvalidToken, UserAlreadyExists, UserInactive
from ..models import User
from . import passwords, tokens


def _rounds() -> int:
    return current_app.config["BCRYPT_ROUNDS"]


def _find_user(*, email: str | None = None, username: str | None = None):
    if email is not None:
        condition = func.lower(User.email) == email.lower()
    else:
        condition = func.lower(User.username) == (username or "").lower()
    return select(User).where(condition)


def register(email: str, username: str, password: str) -> dict[str, Any]:
    """Create a user and start its first session."""
    with unit_of_work() as session:
        taken = session.scalar(
            select(User.id).where(
                (func.lower(User.email) == email.lower()) | (func.lower(User.username) == username.lower())
            )
        )
    if taken is not None:
        raise UserAlreadyExists()

    hashed = passwords.hash_password(password, _rounds())
    user = User(email=email, username=username, hashed_password=hashed)
    try:
        with unit_of_work() as session:
            session.add(user)
    except IntegrityError:
        # Another registration of the same email or username committed first.
        raise UserAlreadyExists() from None
    g.user_id = user.id
    return tokens.issue_pair(user)


def login(password: str, email: str | None = None, username: str | None = None) -> dict[str, Any]:
    """Check credentials and start a session; every failure looks the same."""
    with unit_of_work() as session:
        user = session.scalar(_find_user(email=email, username=username))

    if user is None:
        # Same bcrypt work as a wrong password, so timing does not reveal the account.
        passwords.verify_password(password, passwords.dummy_hash(_rounds()))
        raise InvalidCredentials()
    if not passwords.verify_password(password, user.hashed_password) or not user.is_active:
        raise InvalidCredentials()

    now = datetime.now(UTC)
    values: dict[str, Any] = {"last_login": now, "updated_at": now}
    if passwords.needs_rehash(user.hashed_password, _rounds()):
        values["hashed_password"] = passwords.hash_password(password, _rounds())
    with unit_of_work() as session:
        session.execute(update(User).where(User.id == user.id).values(**values))
    user.last_login = now
    g.user_id = user.id
    return tokens.issue_pair(user)


def refresh(refresh_token: str) -> dict[str, Any]:
    """Exchange a refresh token for a new pair."""
    claims = tokens.decode_refresh_token(refresh_token)
    with unit_of_work() as session:
        user = session.get(User, _user_id(claims))
    if user is None:
        raise InvalidToken()
    if not user.is_active:
        raise UserInactive()
    g.user_id = user.id
    return tokens.issue_pair(user)


def _user_id(claims: dict[str, Any]) -> int:
    try:
        return int(claims["sub"])
    except (KeyError, TypeError, ValueError):
        raise InvalidToken() from None
