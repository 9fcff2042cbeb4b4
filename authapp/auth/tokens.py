"""JWTs on top of flask-jwt-extended: minting a session's pair, decoding refresh tokens,
and every flask-jwt-extended failure routed into the error envelope.

A refresh token's `jti` is random for the first token of a session; each later one is
derived from its parent's (HMAC with the signing key), and the access token's `jti` from
its refresh token's. With the issue time stored server-side, the pair of any refresh
token can be minted again byte for byte, which is how a retired token replayed inside the
reuse interval gets the session's current pair back without any token kept in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import TYPE_CHECKING, Any

from flask_jwt_extended import JWTManager, create_access_token, create_refresh_token, decode_token
from flask_jwt_extended.exceptions import JWTExtendedException
from jwt import ExpiredSignatureError, InvalidTokenError

from .. import settings
from ..errors import InvalidToken, MissingToken, TokenExpired, TokenRevoked, app_error_response

if TYPE_CHECKING:
    from ..models import AuthSession, RefreshToken

TOKEN_TYPE = "bearer"


def new_jti() -> str:
    return uuid.uuid4().hex


def jti_hash(jti: str) -> str:
    """What the database keeps of a refresh token."""
    return hashlib.sha256(jti.encode()).hexdigest()


def _derive(jti: str, purpose: str) -> str:
    key = settings.current().token_derivation_key
    return hmac.new(key, f"{purpose}:{jti}".encode(), hashlib.sha256).hexdigest()[:32]


def child_jti(parent_jti: str) -> str:
    return _derive(parent_jti, "refresh")


def mint_pair(user: Any, session: AuthSession, refresh: RefreshToken, refresh_jti: str) -> dict[str, Any]:
    """The TokenResponse of one refresh token row; the same row always gives the same pair."""
    iat = int(refresh.issued_at.timestamp())
    access_ttl = int(settings.current().access_token_lifetime.total_seconds())
    access_exp = min(iat + access_ttl, int(session.expires_at.timestamp()))
    identity = str(user.id)
    common = {"sid": session.id, "iat": iat, "nbf": iat}
    return {
        "access_token": create_access_token(
            identity=identity,
            additional_claims={**common, "jti": _derive(refresh_jti, "access"), "exp": access_exp},
        ),
        "refresh_token": create_refresh_token(
            identity=identity,
            additional_claims={**common, "jti": refresh_jti, "exp": int(refresh.expires_at.timestamp())},
        ),
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


def init_app(jwt: JWTManager) -> None:
    """Every flask-jwt-extended failure in the error envelope. The session behind a token
    is checked by `auth.context.authenticate`, which the protected views call."""
    jwt.expired_token_loader(lambda _h, _c: app_error_response(TokenExpired()))
    jwt.invalid_token_loader(lambda _reason: app_error_response(InvalidToken()))
    jwt.unauthorized_loader(lambda _reason: app_error_response(MissingToken()))
    jwt.revoked_token_loader(lambda _h, _c: app_error_response(TokenRevoked()))
    jwt.needs_fresh_token_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.token_verification_failed_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.user_lookup_error_loader(lambda _h, _c: app_error_response(InvalidToken()))
