"""Accounts: register, create (operators), look up, activate and deactivate, and replace a
password (the user's own change, or an operator's)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Connection, Select, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit, clock, identifiers, ratelimit, settings
from ..database import autocommit_read, unit_of_work
from ..errors import AppError, InvalidCredentials, MfaRequired, NotFound, TokenRevoked, UserAlreadyExists
from ..mail import outbox
from ..models import AuthSession, MfaTotp, RefreshToken, User
from . import links, mailings, passwords, sessions
from .context import AuthContext, Client


class CredentialsChanged(InvalidCredentials):
    """The password was checked, but a change, reset or deactivation committed since."""


def user_query(*, email: str | None = None, username: str | None = None) -> Select[Any]:
    """A user by email (in its canonical form, as stored) or by username (without regard
    to case); an index on each."""
    if email is not None:
        return select(User).where(User.email == identifiers.canonical_email(email))
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


def email_collisions() -> dict[str, list[tuple[int, str]]]:
    """Accounts whose stored addresses share one canonical form (see `identifiers`)."""
    with unit_of_work() as db:
        rows = db.execute(select(User.id, User.email).order_by(User.id)).all()
    return identifiers.collisions((user_id, email) for user_id, email in rows)


def list_users(*, include_inactive: bool = True) -> list[User]:
    with unit_of_work() as db:
        query = select(User).order_by(User.id)
        if not include_inactive:
            query = query.where(User.is_active.is_(True))
        return list(db.scalars(query).all())


# -- Creating accounts --------------------------------------------------------------------


def create(
    email: str,
    username: str,
    password: str,
    client: Client | None = None,
    *,
    start_session: bool = True,
    send_verification: bool = False,
) -> tuple[User, sessions.Issued | None]:
    """Create a user, and start its first session when `client` is given (a registration)
    unless `start_session` is false; an operator's account starts none. With
    `send_verification`, queue the verification link in the same transaction.
    USER_ALREADY_EXISTS when the email or username is taken, also when another
    registration commits first."""
    # One read outside any transaction (no BEGIN or COMMIT to wait for): it only spares a
    # taken name the bcrypt work; the unique indexes decide below.
    with autocommit_read() as connection:
        taken = connection.scalar(
            select(User.id).where(
                or_(User.email == identifiers.canonical_email(email), func.lower(User.username) == username.lower())
            )
        )
    if taken is not None:
        raise UserAlreadyExists()

    hashed = passwords.hash_password(password, settings.current().bcrypt_rounds)
    now = clock.now()
    user = User(email=email, username=username, hashed_password=hashed, created_at=now, updated_at=now)
    issued = message = None
    try:
        with unit_of_work() as db:
            db.add(user)
            db.flush()
            if client is not None and start_session:
                issued = sessions.start(db, user.id, now, client, first=True)
            if send_verification:
                message = mailings.verify_email(db, user, now)
    except IntegrityError:
        # Another registration of the same email or username committed first.
        raise UserAlreadyExists() from None
    if client is not None:
        audit.record(audit.REGISTER, user_id=user.id, sid=issued.session.id if issued else None)
        if issued is not None:
            issued.record_ended()
    else:
        audit.record(audit.USER_CREATED, user_id=user.id, by="operator")
    if message is not None:
        outbox.record(message)
    return user, issued


def register(email: str, username: str, password: str, client: Client) -> dict[str, Any]:
    """Create an account and start its first session; with EMAIL_VERIFICATION=required,
    no session until the address is verified (the link is on its way)."""
    mode = settings.current().email_verification
    required = mode == "required"
    user, issued = create(
        email, username, password, client, start_session=not required, send_verification=mode != "off"
    )
    if required:
        return {"user": user, "email_verification_required": True}
    return cast(sessions.Issued, issued).pair(user)


# -- Activation and passwords -------------------------------------------------------------


def count_attempt(account: str, user_id: int | None, db: Session | None = None) -> None:
    """Count one password (or second-factor) check on the account's lockout (in `db`'s
    transaction, or one of its own), or raise RATE_LIMITED (audited)."""
    try:
        ratelimit.count_attempt(account, db)
    except AppError:
        audit.record(audit.LOGIN_LOCKED, user_id=user_id)
        raise


def check_current_password(auth: AuthContext, password: str, failure_event: str, **fields: Any) -> str:
    """The stored hash, once `password` is shown to be the user's current one; a wrong
    one is INVALID_CREDENTIALS (audited as `failure_event`) and counts on the account's
    lockout like a failed login, so a stolen access token cannot guess without limit."""
    count_attempt(ratelimit.account_key(auth.user_id, ""), auth.user_id)
    with unit_of_work() as db:  # the auth context's user row carries no hash
        stored = db.scalar(select(User.hashed_password).where(User.id == auth.user_id))
    if stored is None or not passwords.verify_password(password, stored):
        audit.record(failure_event, user_id=auth.user_id, sid=auth.session_id, reason="wrong_password", **fields)
        raise InvalidCredentials()
    return stored


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


def write_if_unchanged(db: Session | Connection, user_id: int, checked_hash: str, values: dict[str, Any]) -> bool:
    """Update the user only if its stored hash is still `checked_hash` and it is still
    active; False when a password change, reset or deactivation came first. The UPDATE
    also locks the user's row until the transaction ends."""
    result = db.execute(
        update(User)
        .where(User.id == user_id, User.hashed_password == checked_hash, User.is_active.is_(True))
        .values(**values)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def lock_user(db: Session, user_id: int) -> None:
    """Lock the user's row until the transaction ends (SELECT ... FOR UPDATE on PostgreSQL;
    SQLite lets one writer at a time anyway). Every change of the MFA state takes it, and
    so does every write that decides between a session and a challenge (after a password
    write, which locks the row too): the MFA state they read is then the committed one."""
    db.execute(select(User.id).where(User.id == user_id).with_for_update())


def mfa_is_on(db: Session | Connection, user_id: int) -> bool:
    return db.scalar(select(MfaTotp.enabled_at).where(MfaTotp.user_id == user_id)) is not None


def _asking_session(db: Session, auth: AuthContext) -> tuple[str, tuple[str, ...]]:
    """The level of the session that asks for a password change, re-read under the user's
    row lock: TOKEN_REVOKED when it was ended since the request was authenticated (MFA
    turned on, a logout, a reset), MFA_REQUIRED when MFA is on and it is not aal2."""
    row = db.execute(
        select(AuthSession.aal, AuthSession.amr).where(
            AuthSession.id == auth.session_id, AuthSession.revoked_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        raise TokenRevoked()
    aal, amr = row
    if mfa_is_on(db, auth.user_id) and aal != sessions.AAL2:
        raise MfaRequired()
    return aal, tuple(amr.split())


@contextmanager
def still_checked(auth: AuthContext, checked_hash: str, failure_event: str, **fields: Any) -> Iterator[Session]:
    """The unit of work of a change that checked the current password (`checked_hash`, from
    `check_current_password`): it goes on only while that hash is still the stored one, the
    user still active and the asking session still live, with the user's row locked until
    it commits. A password change, reset or deactivation that committed since wins: this one
    is audited as `failure_event` with reason `credentials_changed` and gets
    INVALID_CREDENTIALS (TOKEN_REVOKED when only the session ended).

    The failed-login count stays as it is: only a completed login clears it."""
    try:
        with unit_of_work() as db:
            if not write_if_unchanged(db, auth.user_id, checked_hash, {"hashed_password": checked_hash}):
                raise CredentialsChanged()
            _asking_session(db, auth)
            yield db
    except CredentialsChanged:
        audit.record(failure_event, user_id=auth.user_id, sid=auth.session_id, reason="credentials_changed", **fields)
        raise


def replace_password(
    user: Any,
    password: str,
    client: Client | None = None,
    *,
    checked_hash: str | None = None,
    auth: AuthContext | None = None,
) -> tuple[int, sessions.Issued | None]:
    """Store a new password and end every session of the user; with `client` (the user's
    own change) start a new session in the same transaction. Returns (revoked, issued).

    With `checked_hash` (the hash a current password was just checked against) the write
    happens only over that hash and for a still-active user: of two changes racing with
    the same current password, or a change racing a reset or a deactivation, the first one
    wins and the other gets INVALID_CREDENTIALS. An operator's change always wins. The new
    session keeps the level of `auth`'s session as the transaction reads it, under the
    user's row lock: if MFA was turned on since the request was authenticated, that
    session was ended (TOKEN_REVOKED) or raised to aal2, so an account with MFA on gets
    no aal1 session from here.
    """
    hashed = passwords.hash_password(password, settings.current().bcrypt_rounds)
    now = clock.now()
    issued = None
    values = {"hashed_password": hashed, "updated_at": now}
    with unit_of_work() as db:
        if checked_hash is None:
            db.execute(update(User).where(User.id == user.id).values(**values))
        elif not write_if_unchanged(db, user.id, checked_hash, values):
            raise CredentialsChanged()
        level = _asking_session(db, auth) if auth is not None else None
        revoked = sessions.revoke(db, sessions.PASSWORD_CHANGED, now, AuthSession.user_id == user.id)
        if client is not None:
            if level is not None:
                issued = sessions.start(db, user.id, now, client, aal=level[0], amr=level[1])
            else:
                issued = sessions.start(db, user.id, now, client)
        # Links sent before the change (a reset, a change of address) die with the old password.
        links.void(db, user.id, links.PASSWORD_RESET, links.CHANGE_EMAIL)
        notice = mailings.password_changed(db, user, now)
    if issued is not None:
        audit.record(audit.PASSWORD_CHANGED, user_id=user.id, sid=issued.session.id, sessions_revoked=revoked)
        issued.record_ended()
    else:
        audit.record(audit.PASSWORD_CHANGED, user_id=user.id, sessions_revoked=revoked, by="operator")
    outbox.record(notice)
    return revoked, issued


# -- Erasure ------------------------------------------------------------------------------


def delete_user(user: User) -> int:
    """Erase a user (operators): the account, its sessions and their refresh tokens, its
    one-time links, and the address and bodies of its messages (one still waiting is given
    up), in one transaction. The audit line keeps the id only, no personal data. Returns
    the sessions."""
    with unit_of_work() as db:
        outbox.forget_user(db, user.id, clock.now())
        count = db.scalar(select(func.count()).select_from(AuthSession).where(AuthSession.user_id == user.id))
        session_ids = select(AuthSession.id).where(AuthSession.user_id == user.id)
        db.execute(delete(RefreshToken).where(RefreshToken.session_id.in_(session_ids)))
        db.execute(delete(AuthSession).where(AuthSession.user_id == user.id))
        deleted = db.execute(delete(User).where(User.id == user.id)).rowcount  # type: ignore[attr-defined]
    if not deleted:
        raise NotFound(f"No user matches {str(user.id)!r}")
    audit.record(audit.USER_DELETED, user_id=user.id, sessions_deleted=count, by="operator")
    return count or 0
