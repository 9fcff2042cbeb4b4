"""JWT issue and decode on top of flask-jwt-extended."""

from __future__ import annotations

from typing import Any

from flask import current_app, g
from flask_jwt_extended import JWTManager, create_access_token, create_refresh_token, decode_token
from flask_jwt_extended.exceptions import JWTExtendedException
from jwt import ExpiredSignatureError, InvalidTokenError

from ..database import unit_of_work
from ..errors import (
    InvalidToken,
    MissingToken,
    TokenExpired,
    TokenRevoked,
    UserInactive,
    app_error_response,
)
from ..models import User

TOKEN_TYPE = "bearer"


def issue_pair(user: User) -> dict[str, Any]:
    """A TokenResponse for `user`: a new access and refresh token."""
    identity = str(user.id)
    access_ttl = current_app.config["JWT_ACCESS_TOKEN_EXPIRES"]
    return {
        "access_token": create_access_token(identity=identity),
        "refresh_token": create_refresh_token(identity=identity),
        "token_type": TOKEN_TYPE,
        "expires_in": int(access_ttl.total_seconds()),
        "user": user,
    }


def decode_refresh_token(encoded: str) -> dict[str, Any]:
    """The claims of a valid refresh token, or INVALID_TOKEN / TOKEN_EXPIRED."""
    try:
        claims = decode_token(encoded)
    except ExpiredSignatureError:
        raise TokenExpired() from None
    except (InvalidTokenError, JWTExtendedException, ValueError):
        raise InvalidToken() from None
    if claims.get("type") != "refresh":
        raise InvalidToken("A refresh token is required")
    return claims


def _lookup_user(_header: dict[str, Any], claims: dict[str, Any]) -> User | None:
    """Load the token's user once per request; an inactive user is refused here."""
    try:
        user_id = int(claims["sub"])
    except (KeyError, TypeError, ValueError):
        return None
    with unit_of_work() as session:
        user = session.get(User, user_id)
    if user is not None and not user.is_active:
        raise UserInactive()
    if user is not None:
        g.user_id = user.id
    return user


def init_app(jwt: JWTManager) -> None:
    """Route every flask-jwt-extended failure into the error envelope."""
    jwt.user_lookup_loader(_lookup_user)
    jwt.user_lookup_error_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.expired_token_loader(lambda _h, _c: app_error_response(TokenExpired()))
    jwt.invalid_token_loader(lambda _reason: app_error_response(InvalidToken()))
    jwt.unauthorized_loader(lambda _reason: app_error_response(MissingToken()))
    jwt.revoked_token_loader(lambda _h, _c: app_error_response(TokenRevoked()))
    jwt.needs_fresh_token_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.token_verification_failed_loader(lambda _h, _c: app_error_response(InvalidToken()))
