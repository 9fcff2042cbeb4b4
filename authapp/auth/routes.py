"""Thin views: schema in, service call, schema out."""

from __future__ import annotations

from flask_jwt_extended import current_user, jwt_required

from ..openapi import BEARER, Blueprint
from ..schemas import LoginSchema, RefreshSchema, RegisterSchema, TokenResponseSchema, UserSchema
from . import service

blp = Blueprint("auth", __name__, url_prefix="/auth", description="Registration, login and tokens")


@blp.post("/register")
@blp.arguments(RegisterSchema)
@blp.response(201, TokenResponseSchema)
@blp.alt_response(409, response="CONFLICT", description="USER_ALREADY_EXISTS")
@blp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
@blp.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
def register(data):
    """Create an account and start a session."""
    return service.register(**data)


@blp.post("/login")
@blp.arguments(LoginSchema)
@blp.response(200, TokenResponseSchema)
@blp.alt_response(401, response="UNAUTHORIZED", description="INVALID_CREDENTIALS")
@blp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
@blp.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
def login(data):
    """Log in by email or by username."""
    return service.login(**data)


@blp.post("/refresh")
@blp.arguments(RefreshSchema)
@blp.response(200, TokenResponseSchema)
@blp.alt_response(401, response="UNAUTHORIZED", description="INVALID_TOKEN, TOKEN_EXPIRED, USER_INACTIVE")
@blp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
@blp.alt_response(415, response="UNSUPPORTED_MEDIA_TYPE")
def refresh(data):
    """Exchange a refresh token for a new access and refresh token."""
    return service.refresh(data["refresh_token"])


@blp.get("/me")
@jwt_required()
@blp.response(200, UserSchema)
@blp.alt_response(
    401, response="UNAUTHORIZED", description="MISSING_TOKEN, INVALID_TOKEN, TOKEN_EXPIRED, USER_INACTIVE"
)
@blp.doc(security=BEARER)
def me():
    """The user the access token belongs to."""
    return current_user
