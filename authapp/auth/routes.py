"""Thin views: schema in, service call, schema out."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from flask import g
from flask_jwt_extended import current_user, jwt_required
from marshmallow import Schema

from .. import ratelimit
from ..extensions import limiter
from ..openapi import BEARER, Blueprint
from ..schemas import (
    ChangePasswordSchema,
    LoginSchema,
    LogoutSchema,
    RefreshSchema,
    RegisterSchema,
    SessionListSchema,
    TokenResponseSchema,
    UserSchema,
)
from . import service

blp = Blueprint("auth", __name__, url_prefix="/auth", description="Registration, login, tokens and sessions")


def errors(*statuses: int) -> Callable:
    """Document error answers in the envelope, besides the 500 and 503 every route may give."""

    def decorate(view: Callable) -> Callable:
        for status in (*statuses, 500, 503):
            view = blp.alt_response(status, response=HTTPStatus(status).name)(view)
        return view

    return decorate


def json_body(schema: type[Schema], *, required: bool = True) -> Callable:
    """Parse and document a JSON body, with its 400, 413 and 415 answers."""

    def decorate(view: Callable) -> Callable:
        return errors(413, 415)(blp.arguments(schema, required=required)(view))

    return decorate


def authenticated(view: Callable) -> Callable:
    """Require a live access token, and document the bearer scheme and its 401."""
    view = errors(401)(view)
    view = blp.doc(security=BEARER)(view)
    return jwt_required()(view)


@blp.post("/register")
@limiter.limit(ratelimit.register_limit)
@json_body(RegisterSchema)
@blp.response(201, TokenResponseSchema)
@errors(409, 429)
def register(data):
    """Create an account and start a session."""
    return service.register(**data)


@blp.post("/login")
@limiter.limit(ratelimit.login_limit)
@json_body(LoginSchema)
@blp.response(200, TokenResponseSchema)
@errors(401, 429)
def login(data):
    """Log in by email or by username; starts a session."""
    return service.login(**data)


@blp.post("/refresh")
@limiter.limit(ratelimit.refresh_limit)
@json_body(RefreshSchema)
@blp.response(200, TokenResponseSchema)
@errors(401, 429)
def refresh(data):
    """Rotate a refresh token: a new access and refresh token in the same session."""
    return service.refresh(data["refresh_token"])


@blp.get("/me")
@authenticated
@blp.response(200, UserSchema)
def me():
    """The user the access token belongs to."""
    return current_user._get_current_object()  # dumped field by field: not through the proxy


@blp.post("/logout")
@authenticated
@json_body(LogoutSchema, required=False)
@blp.response(204)
def logout(data):
    """End this session (its access and refresh tokens), and the given refresh token's."""
    service.logout(current_user, g.session_id, data.get("refresh_token"))


@blp.post("/logout-all")
@authenticated
@blp.response(204)
def logout_all():
    """End every session of the user."""
    service.logout_all(current_user, g.session_id)


@blp.post("/change-password")
@limiter.limit(ratelimit.login_limit)
@authenticated
@json_body(ChangePasswordSchema)
@blp.response(200, TokenResponseSchema)
@errors(429)
def change_password(data):
    """Change the password (the current one is required); ends every other session."""
    return service.change_password(current_user, g.session_id, **data)


@blp.get("/sessions")
@authenticated
@blp.response(200, SessionListSchema)
def sessions():
    """The user's live sessions."""
    return {"sessions": service.list_sessions(current_user, g.session_id)}


@blp.delete("/sessions/<uuid:session_id>")
@authenticated
@blp.response(204)
@errors(404)
def delete_session(session_id):
    """Revoke one of the user's sessions."""
    service.delete_session(current_user, str(session_id), g.session_id)
