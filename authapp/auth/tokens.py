"""JWTs on top of flask-jwt-extended: minting a session's pair, decoding refresh tokens,
and the per-request session check.

A refresh token's `jti` is random for the first token of a session; each later one is
derived from its parent's (HMAC keyed with JWT_SECRET_KEY, whatever the signing
algorithm), and the access token's `jti` from its refresh token's. With the issue time
stored server-side, the pair of any refresh token can be minted again with the same
claims, which is how a retired token replayed inside the reuse interval gets the
session's current pair back without any token kept in clear. (HS*, RS256 and EdDSA give
the same bytes again; ES256 signatures are randomised, so its pair is signed anew.) When
JWT_SECRET_KEY changes, the chains derived under an older secret are followed with the
secrets of JWT_PREVIOUS_SECRET_KEYS.

Tokens are signed by `keys.sign` and verified by flask-jwt-extended with `keys.decode_key`
as its key loader (authapp/auth/keys.py).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import current_app, g
from flask_jwt_extended import JWTManager, decode_token
from flask_jwt_extended.exceptions import JWTExtendedException
from jwt import ExpiredSignatureError, InvalidTokenError
from sqlalchemy import bindparam, select

from ..database import autocommit_read
from ..errors import (
    InvalidToken,
    MissingToken,
    TokenExpired,
    TokenRevoked,
    UserInactive,
    app_error_response,
)
from ..models import AuthSession, RefreshToken, User
from . import keys, pyjwt_speedup

TOKEN_TYPE = "bearer"


def new_jti() -> str:
    return uuid.uuid4().hex


def jti_hash(jti: str) -> str:
    """What the database keeps of a refresh token."""
    return hashlib.sha256(jti.encode()).hexdigest()


# Until the MFA flows set them per session: a password session.
AAL = "aal1"
AMR = ("pwd",)


def _derivation_secrets() -> list[str]:
    config = current_app.config
    return [config["JWT_SECRET_KEY"], *config.get("JWT_PREVIOUS_SECRET_KEYS", [])]


def _derive(jti: str, purpose: str, secret: str | None = None) -> str:
    key = (secret or current_app.config["JWT_SECRET_KEY"]).encode()
    return hmac.new(key, f"{purpose}:{jti}".encode(), hashlib.sha256).hexdigest()[:32]


def child_jti(parent_jti: str) -> str:
    return _derive(parent_jti, "refresh")


def child_jti_candidates(parent_jti: str) -> list[str]:
    """The jti a child of `parent_jti` has under JWT_SECRET_KEY, then under each previous
    secret (a chain that began before the secret changed)."""
    return list(dict.fromkeys(_derive(parent_jti, "refresh", secret) for secret in _derivation_secrets()))


def mint_pair(user: User, session: AuthSession, refresh: RefreshToken, refresh_jti: str) -> dict[str, Any]:
    """The TokenResponse of one refresh token row; the same row always gives the same pair."""
    iat = int(refresh.issued_at.timestamp())
    access_ttl = int(current_app.config["JWT_ACCESS_TOKEN_EXPIRES"].total_seconds())
    access_exp = min(iat + access_ttl, int(session.expires_at.timestamp()))
    config = current_app.config
    common = {
        "sub": str(user.id),
        "sid": session.id,
        "iat": iat,
        "nbf": iat,
        "iss": config["JWT_ISSUER"],
        "aud": config["JWT_AUDIENCE"],
    }
    signing = keys.signing_key()  # one key for both tokens, even if a rotation lands meanwhile
    access = {**common, "exp": access_exp, "jti": _derive(refresh_jti, "access"), "type": "access"}
    refresh_claims = {**common, "exp": int(refresh.expires_at.timestamp()), "jti": refresh_jti, "type": "refresh"}
    return {
        "access_token": keys.sign({**access, "aal": AAL, "amr": list(AMR)}, signing, access=True),
        "refresh_token": keys.sign(refresh_claims, signing, access=False),
        "token_type": TOKEN_TYPE,
        "expires_in": access_exp - iat,
        "user": user,
    }


def decode_refresh_token(encoded: str, *, allow_expired: bool = False) -> dict[str, Any]:
    """The claims of a well-signed refresh token, or INVALID_TOKEN / TOKEN_EXPIRED."""
    try:
        claims = decode_token(encoded, allow_expired=allow_expired)
    except ExpiredSignatureError:
        raise TokenExpired() from None
    except (InvalidTokenError, JWTExtendedException, ValueError):
        raise InvalidToken() from None
    if claims.get("type") != "refresh" or not isinstance(claims.get("sid"), str):
        raise InvalidToken("A refresh token is required")
    return claims


def user_id_of(claims: dict[str, Any]) -> int:
    sub = claims.get("sub")
    if not keys.is_user_id(sub):  # int() would take " 1", "+1", "1_0" and "١"
        raise InvalidToken()
    return int(sub)


# The user's public columns and the session's state, by primary keys: the one statement of
# every protected request. A Core select of columns (no ORM entity to build and track) is
# the cheapest way there; the row it returns is the request's `current_user`, read-only.
# Not the password hash: a request that needs it (change-password) reads it itself.
_CURRENT_USER_COLUMNS = ("id", "username", "email", "is_active", "created_at", "last_login")
_SESSION_CHECK = (
    select(*(User.__table__.c[name] for name in _CURRENT_USER_COLUMNS), AuthSession.revoked_at, AuthSession.expires_at)
    .join(AuthSession, AuthSession.user_id == User.id)
    .where(AuthSession.id == bindparam("sid"), User.id == bindparam("user_id"))
)


def _check_session(_header: dict[str, Any], claims: dict[str, Any]) -> bool:
    """Load the token's user and session in one indexed query; True when revoked."""
    sid = claims.get("sid")
    if not isinstance(sid, str):
        raise InvalidToken()
    with autocommit_read() as connection:
        user = connection.execute(_SESSION_CHECK, {"sid": sid, "user_id": user_id_of(claims)}).one_or_none()
    if user is None:
        raise InvalidToken()
    g.user_id = user.id
    if not user.is_active:
        raise UserInactive()
    if user.expires_at <= datetime.now(UTC):
        raise TokenExpired()
    g.authapp_user = user
    g.session_id = sid
    return user.revoked_at is not None


def init_app(jwt: JWTManager) -> None:
    """The session check on every protected request, and every flask-jwt-extended failure
    routed into the error envelope."""
    pyjwt_speedup.install()
    jwt.token_in_blocklist_loader(_check_session)
    jwt.user_lookup_loader(lambda _h, _c: g.get("authapp_user"))
    jwt.user_lookup_error_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.expired_token_loader(lambda _h, _c: app_error_response(TokenExpired()))
    jwt.invalid_token_loader(lambda _reason: app_error_response(InvalidToken()))
    jwt.unauthorized_loader(lambda _reason: app_error_response(MissingToken()))
    jwt.revoked_token_loader(lambda _h, _c: app_error_response(TokenRevoked()))
    jwt.needs_fresh_token_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.token_verification_failed_loader(lambda _h, _c: app_error_response(InvalidToken()))
