"""SQLAlchemy models. The migrations own the schema; these mirror it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
    select,
    text,
    true,
    types,
)
from sqlalchemy.orm import Mapped, column_property, mapped_column, relationship

from . import clock
from .extensions import Base, db

# What mypy is told db.Model is: Flask-SQLAlchemy builds it from Base at run time.
if TYPE_CHECKING:
    Model = Base
else:
    Model = db.Model


class UTCDateTime(types.TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime given to a UTCDateTime column")
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


def _now() -> datetime:
    """`clock.now()` looked up at each insert and update (a default of `clock.now` itself
    would keep the function there was at import, and a test that moves the clock would
    not move these columns)."""
    return clock.now()


class User(Model):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(50), nullable=False)
    email: Mapped[str] = mapped_column(String(100), nullable=False)
    hashed_password: Mapped[str] = mapped_column(String(255), nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=_now, onupdate=_now)
    last_login: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the current address was shown to be the user's (a link used); None: not yet.
    email_verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    @property
    def email_verified(self) -> bool:
        return self.email_verified_at is not None

    __table_args__ = (
        # Uniqueness enforced by the database itself: usernames (ASCII) and addresses
        # without regard to case; addresses are looked up as stored, in their canonical
        # form (authapp.identifiers), by the second index on them.
        Index("ix_users_username_lower", func.lower(username), unique=True),
        Index("ix_users_email_lower", func.lower(email), unique=True),
        Index("ix_users_email", email, unique=True),
    )

    def __repr__(self) -> str:  # never shows the hash
        return f"<User {self.id} {self.username!r}>"


class AuthSession(Model):
    """One login (register, login or change-password) and the refresh tokens rotated from it."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ip: Mapped[str | None] = mapped_column(String(45), nullable=True)
    user_agent: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The assurance level the session was authenticated at (aal1: a password; aal2: a
    # password and a second factor), and how (RFC 8176 values, space-separated).
    aal: Mapped[str] = mapped_column(String(8), nullable=False, default="aal1", server_default="aal1")
    amr: Mapped[str] = mapped_column(String(32), nullable=False, default="pwd", server_default="pwd")

    user: Mapped[User] = relationship(lazy="raise")

    def is_live(self, now: datetime) -> bool:
        return self.revoked_at is None and self.expires_at > now


class RefreshToken(Model):
    """A refresh token issued in a session; only a hash of its `jti` is kept."""

    __tablename__ = "refresh_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True)
    jti_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("refresh_tokens.id", ondelete="SET NULL"), nullable=True, unique=True
    )
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class LoginGuard(Model):
    """One row per account whose login attempts are counted: the row a counting
    transaction locks, so that parallel attempts on one account are counted one by one."""

    __tablename__ = "login_guards"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)


class LoginAttempt(Model):
    """One counted login attempt on an account (`key`: `user:<id>`, or a hash of an
    identifier that names no account), kept for LOGIN_FAILURE_WINDOW."""

    __tablename__ = "login_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(80), nullable=False)
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    __table_args__ = (Index("ix_login_attempts_key_attempted_at", key, attempted_at),)


class OneTimeToken(Model):
    """A link's token (password reset, email verification, change of address): only its
    SHA-256 is kept; `address` is the address the link was sent to and proves. A row
    without a user is a decoy, written by a reset request for an address with no account
    so that such a request does the same work; no link carries its token."""

    __tablename__ = "one_time_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    address: Mapped[str] = mapped_column(String(100), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_one_time_tokens_user_kind", "user_id", "kind"),)


class OutboxMessage(Model):
    """A message to deliver, written in the transaction of the change that causes it.

    `recipient_key` (a hash of the address) counts messages per recipient for
    MAIL_RATE_LIMIT; the address and the bodies are erased once the message is delivered
    or given up. A `suppressed` row was never to be sent (no account, or over the limit):
    it is there so that every request does the same work.
    """

    __tablename__ = "mail_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)  # queued sending sent given_up suppressed
    recipient_key: Mapped[str] = mapped_column(String(64), nullable=False)
    recipient: Mapped[str | None] = mapped_column(String(255), nullable=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    subject: Mapped[str | None] = mapped_column(Text, nullable=True)
    body_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    body_html: Mapped[str | None] = mapped_column(Text, nullable=True)
    message_id: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    give_up_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(36), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(255), nullable=True)

    __table_args__ = (
        Index("ix_mail_outbox_due", "status", "next_attempt_at"),
        Index("ix_mail_outbox_recipient", "recipient_key", "kind", "created_at"),
    )


class SigningKey(Model):
    """A key pair that signs or verifies tokens (RS256, ES256, EdDSA); `kid` is its RFC 7638
    thumbprint. The private part is stored only encrypted (authapp/auth/keys.py)."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16), nullable=False)
    # standby (published, verifies), active (also signs: exactly one), retired (neither)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    public_jwk: Mapped[str] = mapped_column(Text, nullable=False)
    # None once retired: a retired key never signs again.
    private_key_sealed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When it last stopped signing (another key was activated): tokens it signed live on
    # until their own expiry, so retiring it earlier logs users out.
    deactivated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint("state IN ('standby', 'active', 'retired')", name="ck_signing_keys_state"),
        Index(
            "uq_signing_keys_one_active",
            "state",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )


class MfaTotp(Model):
    """A user's TOTP factor: pending (`enabled_at` None) from setup until a code confirms
    it, then on. The secret is stored only sealed (authapp/auth/keys.py); `last_used_step`
    is the time step of the last code accepted, so that no code is accepted twice;
    `setup_session_id` is the session that set a pending factor up, the only one that
    may enable it."""

    __tablename__ = "mfa_totp"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    secret_sealed: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    enabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    setup_session_id: Mapped[str | None] = mapped_column(String(36), nullable=True)


class MfaRecoveryCode(Model):
    """One single-use recovery code of a user with MFA on; only its SHA-256 is kept."""

    __tablename__ = "mfa_recovery_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    code_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("uq_mfa_recovery_codes_user_code", "user_id", "code_hash", unique=True),)


# When the user's MFA was turned on (None: off), loaded with every User (the `mfa_enabled`
# of the API's User object).
User.mfa_enabled_at = column_property(
    select(MfaTotp.enabled_at).where(MfaTotp.user_id == User.id).correlate_except(MfaTotp).scalar_subquery()
)
