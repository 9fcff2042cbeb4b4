"""Multi-factor authentication: TOTP (RFC 6238) and single-use recovery codes.

Setup (the current password required) stores a new secret, sealed at rest the way the
signing keys are (`keys.seal_bytes`, AES-256-GCM under a key derived from JWT_SECRET_KEY),
pending until a code confirms it; enabling turns MFA on, returns the recovery codes (kept
only as SHA-256), raises the current session to aal2 and ends every other session.

With MFA on, a right password (login, password reset) gives a challenge instead of a
session: a random token stored as a one-time link token (`links`, hashed, single-use,
five minutes), which opens nothing but POST /auth/mfa/verify. The verification spends the
challenge, the code's time step (`last_used_step`, a compare-and-set) or the recovery
code, checks that the password is still the one the challenge was given for, and starts
an aal2 session, all in one transaction: of two verifications racing with one code, one
gets a session. Every code tried counts on the account's lockout like a password.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import secrets
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

import pyotp
import segno
from sqlalchemy import Connection, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit, clock, ratelimit, settings
from ..database import unit_of_work
from ..errors import (
    AppError,
    InvalidCredentials,
    InvalidLink,
    InvalidMfaCode,
    InvalidToken,
    MfaAlreadyEnabled,
    MfaNotEnabled,
    MfaRequired,
    ServiceUnavailable,
    TokenRevoked,
    ValidationFailed,
)
from ..models import AuthSession, MfaRecoveryCode, MfaTotp, User
from . import accounts, keys, links, sessions
from .context import AuthContext, Client

log = logging.getLogger("authapp.mfa")

# RFC 6238 as authenticator apps implement it: SHA-1, 6 digits, 30-second steps (pyotp's
# defaults), and one step of clock drift either way.
DIGITS = 6
DRIFT_STEPS = 1
SECRET_LENGTH = 32  # base32 characters: 160 bits, RFC 4226's recommended secret size
CHALLENGE_LIFETIME = timedelta(minutes=5)
# How long a pending setup can be enabled, and only from the session that set it up.
SETUP_LIFETIME = timedelta(minutes=10)
MFA_CHALLENGE = "mfa_challenge"  # a one_time_tokens kind
RECOVERY_CODE_COUNT = 10
# A recovery code: 24 base32 characters (120 bits, past the 112 under which ASVS 6.5.2
# asks for a salted password hash) shown in six groups of four.
_RECOVERY_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_RECOVERY_LENGTH = 24


class MfaSecretUnsealable(ServiceUnavailable):
    detail = "The second factor cannot be checked right now"


# -- Secrets, codes -----------------------------------------------------------------------


def _associated_data(user_id: int) -> bytes:
    # Binds a sealed secret to its user: a ciphertext copied to another row does not open.
    return f"authapp totp secret user {user_id}".encode()


def _seal(secret: str, user_id: int) -> bytes:
    return keys.seal_bytes(secret.encode(), _associated_data(user_id), keys.ring().config)


def _write_resealed(user_id: int, sealed: bytes, fresh: bytes) -> bool:
    return keys.replace_sealed(MfaTotp.secret_sealed, sealed, fresh, MfaTotp.user_id == user_id)


def _secret_of(factor: MfaTotp) -> str:
    """The factor's secret; one sealed under a previous JWT_SECRET_KEY is sealed again
    under the current one, so that the previous secret can be removed in time."""
    opened, fresh = keys.reopen(factor.secret_sealed, _associated_data(factor.user_id), keys.ring().config)
    if opened is None:
        log.error(
            "the TOTP secret of user %s cannot be opened: it was sealed with a secret that is neither "
            "JWT_SECRET_KEY nor in JWT_PREVIOUS_SECRET_KEYS",
            factor.user_id,
            extra={"event": "mfa_secret_unsealable", "user_id": factor.user_id},
        )
        raise MfaSecretUnsealable(headers={"Retry-After": "60"})
    if fresh is not None and _write_resealed(factor.user_id, factor.secret_sealed, fresh):
        factor.secret_sealed = fresh  # what enable's compare-and-set now finds
    return opened.decode()


def reseal_secrets(config: dict[str, Any]) -> keys.Resealed:
    """Seal every stored TOTP secret (on or pending) again under JWT_SECRET_KEY (`flask
    keys reseal`)."""
    result = keys.Resealed()
    with unit_of_work() as db:
        rows = db.execute(select(MfaTotp.user_id, MfaTotp.secret_sealed)).all()
    for user_id, sealed in rows:
        plain, fresh = keys.reopen(sealed, _associated_data(user_id), config)
        written = fresh is not None and _write_resealed(user_id, sealed, fresh)
        result.count(f"TOTP secret of user {user_id}", plain, fresh, written)
    return result


def matching_step(secret: str, code: str, now: datetime) -> int | None:
    """The time step whose code is `code`, within DRIFT_STEPS of now; None when none is."""
    totp = pyotp.TOTP(secret, digits=DIGITS)
    current = totp.timecode(now)
    found = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            found = step
    return found


def _new_recovery_codes() -> list[str]:
    codes = []
    for _ in range(RECOVERY_CODE_COUNT):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_LENGTH))
        codes.append("-".join(raw[i : i + 4] for i in range(0, _RECOVERY_LENGTH, 4)))
    return codes


def _recovery_hash(user_id: int, code: str) -> str:
    """What the database keeps of a recovery code; spaces, dashes and case do not count."""
    canonical = "".join(code.split()).replace("-", "").lower()
    return hashlib.sha256(f"{user_id}:{canonical}".encode()).hexdigest()


def _store_recovery_codes(db: Session, user_id: int, codes: list[str], now: datetime) -> None:
    """Replace the user's recovery codes (the old ones, used or not, are void)."""
    db.execute(delete(MfaRecoveryCode).where(MfaRecoveryCode.user_id == user_id))
    db.add_all(
        MfaRecoveryCode(user_id=user_id, code_hash=_recovery_hash(user_id, code), created_at=now) for code in codes
    )


def _fingerprint(hashed_password: str) -> str:
    """Which password a challenge was given for, without keeping the hash itself."""
    return hashlib.sha256(hashed_password.encode()).hexdigest()


def _require_aal2(auth: AuthContext) -> None:
    # The session row's level (auth.context), which enabling raises at once.
    if auth.aal != sessions.AAL2:
        raise MfaRequired()


def _check_password(auth: AuthContext, current_password: str, action: str) -> str:
    """The stored hash, once `current_password` is shown to be the current one;
    INVALID_CREDENTIALS counted as a failed login otherwise."""
    return accounts.check_current_password(auth, current_password, audit.MFA_CHANGE_FAILED, action=action)


def _still_checked(auth: AuthContext, checked_hash: str, action: str) -> AbstractContextManager[Session]:
    """The unit of work of an MFA change over the password hash it checked
    (`accounts.still_checked`: the user's row locked, as every MFA change)."""
    return accounts.still_checked(auth, checked_hash, audit.MFA_CHANGE_FAILED, action=action)


# -- Setup, enable, disable, new recovery codes ------------------------------------------


def setup(auth: AuthContext, current_password: str) -> dict[str, Any]:
    """A new pending TOTP secret (replacing a pending one), its otpauth:// URI and QR code."""
    if auth.user.mfa_enabled_at is not None:
        raise MfaAlreadyEnabled()
    checked = _check_password(auth, current_password, "setup")
    secret = pyotp.random_base32(SECRET_LENGTH)
    now = clock.now()
    for _ in range(3):
        try:
            with _still_checked(auth, checked, "setup") as db:
                if db.scalar(select(MfaTotp.enabled_at).where(MfaTotp.user_id == auth.user_id)) is not None:
                    raise MfaAlreadyEnabled()
                db.execute(delete(MfaTotp).where(MfaTotp.user_id == auth.user_id))
                db.add(
                    MfaTotp(
                        user_id=auth.user_id,
                        secret_sealed=_seal(secret, auth.user_id),
                        created_at=now,
                        setup_session_id=auth.session_id,
                    )
                )
            break
        except IntegrityError:  # a concurrent setup inserted its own row first: replace it
            continue
    else:
        raise ServiceUnavailable("Too many concurrent setups; try again", headers={"Retry-After": "1"})
    uri = pyotp.TOTP(secret, digits=DIGITS).provisioning_uri(
        name=auth.user.email, issuer_name=settings.current().mfa_issuer
    )
    svg = io.BytesIO()
    segno.make(uri, error="m").save(svg, kind="svg", scale=4, xmldecl=False, title="TOTP setup QR code")
    audit.record(audit.MFA_SETUP, user_id=auth.user_id, sid=auth.session_id)
    return {"secret": secret, "otpauth_uri": uri, "qr_svg": svg.getvalue().decode()}


def _no_pending_setup(reason: str) -> ValidationFailed:
    return ValidationFailed(errors={"code": [f"No TOTP setup is pending{reason}: start one at /auth/mfa/totp/setup."]})


def enable(auth: AuthContext, code: str) -> dict[str, Any]:
    """Confirm the pending secret with a code: MFA on, the current session aal2, every other
    session ended; returns the recovery codes (the only time they are shown).

    Only the session that set the secret up, within SETUP_LIFETIME of the setup, can
    enable it, and every code tried counts on the account's lockout like a password."""
    now = clock.now()
    with unit_of_work() as db:
        factor = db.get(MfaTotp, auth.user_id)
    if factor is not None and factor.enabled_at is not None:
        raise MfaAlreadyEnabled()
    if factor is None or factor.setup_session_id != auth.session_id:
        raise _no_pending_setup(" in this session")
    if factor.created_at + SETUP_LIFETIME < now:
        raise _no_pending_setup(" (the last one expired)")
    accounts.count_attempt(ratelimit.account_key(auth.user_id, ""), auth.user_id)
    step = matching_step(_secret_of(factor), code, now)
    if step is None:
        audit.record(audit.MFA_ENABLE_FAILED, user_id=auth.user_id, sid=auth.session_id, reason="wrong_code")
        raise ValidationFailed(errors={"code": ["Wrong code: enter the code the authenticator app shows now."]})
    codes = _new_recovery_codes()
    with unit_of_work() as db:
        # First the user's row lock, which a login, a reset and a password change hold
        # while they decide between a session and a challenge.
        accounts.lock_user(db, auth.user_id)
        # Only the secret the code was checked against, still pending: a setup or an
        # enable that committed meanwhile wins.
        confirmed = db.execute(
            update(MfaTotp)
            .where(
                MfaTotp.user_id == auth.user_id,
                MfaTotp.enabled_at.is_(None),
                MfaTotp.secret_sealed == factor.secret_sealed,
                MfaTotp.setup_session_id == auth.session_id,
            )
            .values(enabled_at=now, last_used_step=step)
        ).rowcount  # type: ignore[attr-defined]
        if confirmed != 1:
            raise ValidationFailed(errors={"code": ["The setup changed meanwhile: start again."]})
        _store_recovery_codes(db, auth.user_id, codes, now)
        upgraded = db.execute(
            update(AuthSession)
            .where(AuthSession.id == auth.session_id, AuthSession.revoked_at.is_(None))
            .values(aal=sessions.AAL2, amr=" ".join(sessions.SECOND_FACTOR))
        ).rowcount  # type: ignore[attr-defined]
        if upgraded != 1:  # this very session was ended meanwhile
            raise TokenRevoked()
        revoked = sessions.revoke(
            db, sessions.MFA_ENABLED, now, AuthSession.user_id == auth.user_id, AuthSession.id != auth.session_id
        )
    audit.record(audit.MFA_ENABLED, user_id=auth.user_id, sid=auth.session_id, sessions_revoked=revoked)
    return {"recovery_codes": codes}


def regenerate_recovery_codes(auth: AuthContext, current_password: str) -> dict[str, Any]:
    """A new set of recovery codes (aal2 session and current password); the old set is void."""
    _require_aal2(auth)
    checked = _check_password(auth, current_password, "recovery_codes")
    codes = _new_recovery_codes()
    with _still_checked(auth, checked, "recovery_codes") as db:
        if db.scalar(select(MfaTotp.enabled_at).where(MfaTotp.user_id == auth.user_id)) is None:
            raise MfaNotEnabled()
        _store_recovery_codes(db, auth.user_id, codes, clock.now())
    audit.record(audit.RECOVERY_CODES_REGENERATED, user_id=auth.user_id, sid=auth.session_id)
    return {"recovery_codes": codes}


def _remove(db: Session, user_id: int) -> int:
    """Delete the user's factor (on or pending) and recovery codes; returns 1 if MFA was on."""
    was_on = db.execute(delete(MfaTotp).where(MfaTotp.user_id == user_id, MfaTotp.enabled_at.is_not(None))).rowcount  # type: ignore[attr-defined]
    db.execute(delete(MfaTotp).where(MfaTotp.user_id == user_id))
    db.execute(delete(MfaRecoveryCode).where(MfaRecoveryCode.user_id == user_id))
    links.void(db, user_id, MFA_CHALLENGE)
    return was_on


def disable(auth: AuthContext, current_password: str) -> None:
    """Turn MFA off (aal2 session and current password); every other session ends."""
    _require_aal2(auth)
    checked = _check_password(auth, current_password, "disable")
    now = clock.now()
    with _still_checked(auth, checked, "disable") as db:  # the user's row locked, as every MFA change
        if not _remove(db, auth.user_id):
            raise MfaNotEnabled()
        revoked = sessions.revoke(
            db, sessions.MFA_DISABLED, now, AuthSession.user_id == auth.user_id, AuthSession.id != auth.session_id
        )
    audit.record(audit.MFA_DISABLED, user_id=auth.user_id, sid=auth.session_id, sessions_revoked=revoked)


def reset(user: User) -> tuple[bool, int]:
    """An operator turns MFA off for a user (a lost phone and lost codes) and ends every
    session of the user. Returns (MFA was on, sessions revoked)."""
    with unit_of_work() as db:
        accounts.lock_user(db, user.id)
        was_on = bool(_remove(db, user.id))
        revoked = sessions.revoke(db, sessions.MFA_RESET, clock.now(), AuthSession.user_id == user.id)
    # Only a reset that turned MFA off counts as `disabled` (audit and metrics).
    event = audit.MFA_DISABLED if was_on else audit.MFA_RESET
    audit.record(event, user_id=user.id, sessions_revoked=revoked, was_on=was_on, by="operator")
    return was_on, revoked


# -- The second step of a login -----------------------------------------------------------


def is_enabled(db: Session | Connection, user_id: int) -> bool:
    """Whether MFA is on; read it under the user's row lock (`accounts.lock_user`, or any
    UPDATE of the user) to decide between a session and a challenge."""
    return accounts.mfa_is_on(db, user_id)


def challenge(db: Session, user_id: int, checked_hash: str, now: datetime) -> dict[str, Any]:
    """Add a challenge for a user whose password (stored as `checked_hash`) was just
    checked to the unit of work; returns the MfaChallenge answer."""
    # The address column holds which password the challenge is for: a change, a reset or
    # a deactivation since then leaves the challenge without a session to give.
    token = links.issue(db, MFA_CHALLENGE, user_id, _fingerprint(checked_hash), now, CHALLENGE_LIFETIME)
    return {"mfa_required": True, "mfa_token": token, "expires_in": int(CHALLENGE_LIFETIME.total_seconds())}


def _dead_challenge() -> InvalidToken:
    return InvalidToken("The MFA token is invalid, has expired or was already used")


def _failed(user_id: int | None, reason: str, error: AppError) -> AppError:
    audit.record(audit.MFA_CHALLENGE_FAILED, user_id=user_id, reason=reason)
    return error


def verify(mfa_token: str, client: Client, code: str | None = None, recovery_code: str | None = None) -> dict[str, Any]:
    """A challenge and a TOTP code (or a recovery code): an aal2 session."""
    now = clock.now()
    with unit_of_work() as db:
        try:
            link = links.find(db, mfa_token, now, MFA_CHALLENGE)
        except InvalidLink:
            raise _failed(None, "invalid_challenge", _dead_challenge()) from None
        user = db.get(User, link.user_id)
        factor = db.get(MfaTotp, link.user_id)
    if user is None:
        raise _failed(None, "invalid_challenge", _dead_challenge())
    account = ratelimit.account_key(user.id, "")
    accounts.count_attempt(account, user.id)
    if not user.is_active or link.address != _fingerprint(user.hashed_password):
        raise _failed(user.id, "credentials_changed", InvalidCredentials())
    if factor is None or factor.enabled_at is None:
        raise _failed(user.id, "mfa_off", InvalidCredentials())
    step = None
    if code is not None:
        step = matching_step(_secret_of(factor), code, now)
        if step is None:
            raise _failed(user.id, "wrong_code", InvalidMfaCode())
    with unit_of_work() as db:
        # The same password and an active user still (the UPDATE locks the row).
        if not accounts.write_if_unchanged(db, user.id, user.hashed_password, {"last_login": now}):
            raise _failed(user.id, "credentials_changed", InvalidCredentials())
        try:
            links.spend(db, link, now)
        except InvalidLink:
            raise _failed(user.id, "challenge_used", _dead_challenge()) from None
        if step is not None:
            # Compare-and-set: a code of this step, or an earlier one, was not accepted yet.
            condition = or_(MfaTotp.last_used_step.is_(None), MfaTotp.last_used_step < step)
            spent = db.execute(
                update(MfaTotp)
                .where(MfaTotp.user_id == user.id, MfaTotp.enabled_at.is_not(None), condition)
                .values(last_used_step=step)
            ).rowcount  # type: ignore[attr-defined]
            reason = "code_reused"
        else:
            spent = db.execute(
                update(MfaRecoveryCode)
                .where(
                    MfaRecoveryCode.user_id == user.id,
                    MfaRecoveryCode.code_hash == _recovery_hash(user.id, recovery_code or ""),
                    MfaRecoveryCode.used_at.is_(None),
                )
                .values(used_at=now)
            ).rowcount  # type: ignore[attr-defined]
            reason = "wrong_recovery_code"
        if spent != 1:
            raise _failed(user.id, reason, InvalidMfaCode())
        issued = sessions.start(db, user.id, now, client, aal=sessions.AAL2, amr=sessions.SECOND_FACTOR)
    ratelimit.clear_failures(account)
    user.last_login = now
    factor_name = "totp" if step is not None else "recovery_code"
    if step is None:
        audit.record(audit.RECOVERY_CODE_USED, user_id=user.id, sid=issued.session.id)
    audit.record(audit.LOGIN_SUCCESS, user_id=user.id, sid=issued.session.id, aal=sessions.AAL2, factor=factor_name)
    issued.record_ended()
    return issued.pair(user)
