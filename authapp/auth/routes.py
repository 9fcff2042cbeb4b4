"""Thin views: schema in, service call, schema out."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from http import HTTPStatus
from typing import Any

from flask import g, request
from marshmallow import Schema

from .. import ratelimit, security
from ..extensions import limiter
from ..observability import requests
from ..openapi import BEARER, Blueprint
from ..schemas import (
    AcceptedSchema,
    ChangeEmailSchema,
    ChangePasswordSchema,
    CurrentPasswordSchema,
    LoginResponseSchema,
    LoginSchema,
    LogoutSchema,
    MfaEnableSchema,
    MfaSetupResponseSchema,
    MfaVerifySchema,
    PasswordResetRequestSchema,
    PasswordResetSchema,
    RecoveryCodesSchema,
    RefreshSchema,
    RegisterResponseSchema,
    RegisterSchema,
    SessionListSchema,
    TokenResponseSchema,
    UserSchema,
    VerifyEmailSchema,
    token_response_out,
    user_out,
)
from ..speedups import json_response
from . import accounts, context, keys, mfa, recovery, sessions, verification
from . import login as login_flow
from . import refresh as refresh_flow
from .context import Client

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
        # An instance, made once: given the class, webargs makes one for every request
        # (marshmallow 4 keeps no state of a load on the schema).
        return errors(413, 415)(blp.arguments(schema(), required=required)(view))

    return decorate


def client() -> Client:
    """The caller as this request shows it: the address nginx saw, and the user agent."""
    return Client(ip=request.remote_addr, user_agent=(request.user_agent.string or "")[:255] or None)


def authenticated(view: Callable) -> Callable:
    """Require a live access token and pass its `auth` context to the view; document the
    bearer scheme and its 401."""
    view = blp.doc(security=BEARER)(errors(401)(view))

    @wraps(view)
    def check_token(*args: Any, **kwargs: Any) -> Any:
        claims = keys.decode_access_token(security.bearer_token())
        auth = g.auth = context.authenticate(claims)
        request.environ[requests.USER_ID_KEY] = auth.user_id  # the request's log line takes it there
        return view(*args, auth=auth, **kwargs)

    return check_token


@blp.post("/register")
@limiter.limit(ratelimit.register_limit)
@json_body(RegisterSchema)
@blp.response(201, RegisterResponseSchema)
@errors(409, 429)
def register(data):
    """Create an account and start a session."""
    return accounts.register(**data, client=client())


@blp.post("/login")
@limiter.limit(ratelimit.login_limit)
@json_body(LoginSchema)
@blp.response(200, LoginResponseSchema)
@errors(401, 403, 429)
def login(data):
    """Log in by email or by username; starts a session, or answers an MfaChallenge when MFA is on
    (403 EMAIL_NOT_VERIFIED with EMAIL_VERIFICATION=required)."""
    return login_flow.login(**data, client=client())


@blp.post("/refresh")
@limiter.limit(ratelimit.refresh_limit)
@json_body(RefreshSchema)
@blp.written_response(200, TokenResponseSchema)
@errors(401, 429)
def refresh(data):
    """Rotate a refresh token: a new access and refresh token in the same session."""
    # What TokenResponseSchema would dump, without marshmallow.
    return json_response(token_response_out(refresh_flow.refresh(data["refresh_token"])))


@blp.get("/me")
@authenticated
@blp.written_response(200, UserSchema)
def me(auth):
    """The user the access token belongs to."""
    return json_response(user_out(auth.user))  # what UserSchema would dump, without marshmallow


@blp.post("/logout")
@authenticated
@json_body(LogoutSchema, required=False)
@blp.response(204)
def logout(data, auth):
    """End this session (its access and refresh tokens), and the given refresh token's."""
    sessions.logout(auth, data.get("refresh_token"))


@blp.post("/logout-all")
@authenticated
@blp.response(204)
def logout_all(auth):
    """End every session of the user."""
    sessions.end_all(auth.user_id, sessions.LOGOUT_ALL, sid=auth.session_id)


@blp.post("/change-password")
@limiter.limit(ratelimit.login_limit)
@authenticated
@json_body(ChangePasswordSchema)
@blp.response(200, TokenResponseSchema)
@errors(429)
def change_password(data, auth):
    """Change the password (the current one is required); ends every other session."""
    return login_flow.change_password(auth, client(), **data)


@blp.get("/sessions")
@authenticated
@blp.response(200, SessionListSchema)
def list_sessions(auth):
    """The user's live sessions."""
    return {"sessions": sessions.list_live(auth)}


@blp.delete("/sessions/<uuid:session_id>")
@authenticated
@blp.response(204)
@errors(404)
def delete_session(session_id, auth):
    """Revoke one of the user's sessions."""
    sessions.delete_session(auth, str(session_id))


# -- Email: password reset, verification, change of address -------------------------------

ACCEPTED = {"status": "accepted"}


@blp.post("/password-reset/request")
@limiter.limit(ratelimit.mail_request_limit)
@json_body(PasswordResetRequestSchema)
@blp.response(202, AcceptedSchema)
@errors(429)
def password_reset_request(data):
    """Email a password-reset link; the same answer whether or not the address has an account."""
    recovery.request_reset(data["email"])
    return ACCEPTED


@blp.post("/password-reset")
@limiter.limit(ratelimit.login_limit)
@json_body(PasswordResetSchema)
@blp.response(200, LoginResponseSchema)
@errors(429)
def password_reset(data):
    """Set a new password with a reset link's token; ends every session and starts a new one
    (or answers an MfaChallenge when MFA is on)."""
    return recovery.reset(data["token"], data["new_password"], client())


@blp.post("/verify-email/request")
@limiter.limit(ratelimit.mail_request_limit)
@authenticated
@blp.response(202, AcceptedSchema)
@errors(429)
def verify_email_request(auth):
    """Email a new verification link (nothing is sent when the address is verified already)."""
    verification.request_verification(auth)
    return ACCEPTED


@blp.post("/verify-email")
@limiter.limit(ratelimit.login_limit)
@json_body(VerifyEmailSchema)
@blp.response(200, UserSchema)
@errors(409, 429)
def verify_email(data):
    """Use an email link's token: the address is verified (for a change of address: it becomes the account's)."""
    return verification.verify(data["token"])


@blp.post("/change-email")
@limiter.limit(ratelimit.login_limit)
@authenticated
@json_body(ChangeEmailSchema)
@blp.response(202, AcceptedSchema)
@errors(409, 429)
def change_email(data, auth):
    """Change the address (the current password is required): a link goes to the new address."""
    verification.request_change(auth, data["new_email"], data["current_password"])
    return ACCEPTED


# -- Multi-factor authentication (TOTP) ---------------------------------------------------


@blp.post("/mfa/totp/setup")
@limiter.limit(ratelimit.login_limit)
@authenticated
@json_body(CurrentPasswordSchema)
@blp.response(200, MfaSetupResponseSchema)
@errors(409, 429)
def mfa_setup(data, auth):
    """Start TOTP setup (the current password is required): a secret, its otpauth:// URI and QR code."""
    return mfa.setup(auth, data["current_password"])


@blp.post("/mfa/totp/enable")
@limiter.limit(ratelimit.login_limit)
@authenticated
@json_body(MfaEnableSchema)
@blp.response(200, RecoveryCodesSchema)
@errors(409, 429)
def mfa_enable(data, auth):
    """Confirm the pending setup with a code: MFA on, recovery codes shown once, every other session ended."""
    return mfa.enable(auth, data["code"])


@blp.post("/mfa/verify")
@limiter.limit(ratelimit.login_limit)
@json_body(MfaVerifySchema)
@blp.response(200, TokenResponseSchema)
@errors(401, 429)
def mfa_verify(data):
    """The second step of a login: the MfaChallenge's token and a TOTP code or a recovery code."""
    return mfa.verify(data["mfa_token"], client(), code=data.get("code"), recovery_code=data.get("recovery_code"))


@blp.post("/mfa/recovery-codes")
@limiter.limit(ratelimit.login_limit)
@authenticated
@json_body(CurrentPasswordSchema)
@blp.response(200, RecoveryCodesSchema)
@errors(403, 409, 429)
def mfa_recovery_codes(data, auth):
    """A new set of recovery codes (aal2 session and the current password); the old set is void."""
    return mfa.regenerate_recovery_codes(auth, data["current_password"])


@blp.post("/mfa/disable")
@limiter.limit(ratelimit.login_limit)
@authenticated
@json_body(CurrentPasswordSchema)
@blp.response(204)
@errors(403, 409, 429)
def mfa_disable(data, auth):
    """Turn MFA off (aal2 session and the current password); every other session ends."""
    mfa.disable(auth, data["current_password"])
