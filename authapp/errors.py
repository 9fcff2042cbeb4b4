"""Domain errors and the one error envelope that every layer answers with."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from .clock import iso_now

log = logging.getLogger("authapp.errors")


class AppError(Exception):
    """An error the API answers with its own status and `error_code`."""

    status = 500
    code = "INTERNAL_ERROR"
    detail = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        errors: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.detail)
        self.detail = detail or self.detail
        self.headers = headers or {}
        self.errors = errors


class ValidationFailed(AppError):
    status, code, detail = 400, "VALIDATION_ERROR", "Request validation failed"


class InvalidCredentials(AppError):
    status, code, detail = 401, "INVALID_CREDENTIALS", "Invalid credentials"


class MissingToken(AppError):
    status, code, detail = 401, "MISSING_TOKEN", "Missing bearer token"


class InvalidToken(AppError):
    status, code, detail = 401, "INVALID_TOKEN", "Invalid token"


class TokenExpired(AppError):
    status, code, detail = 401, "TOKEN_EXPIRED", "Token has expired"


class TokenRevoked(AppError):
    status, code, detail = 401, "TOKEN_REVOKED", "Token has been revoked"


class UserInactive(AppError):
    status, code, detail = 401, "USER_INACTIVE", "User account is inactive"


class InvalidMfaCode(AppError):
    status, code, detail = 401, "INVALID_MFA_CODE", "Invalid, expired or already used code"


class MfaRequired(AppError):
    status, code, detail = 403, "MFA_REQUIRED", "This needs a session that passed the second factor (aal2)"


class NotFound(AppError):
    status, code, detail = 404, "NOT_FOUND", "Resource not found"


class InvalidLink(AppError):
    status, code, detail = 400, "INVALID_LINK", "This link is invalid, has expired or was already used"


class EmailNotVerified(AppError):
    status, code, detail = 403, "EMAIL_NOT_VERIFIED", "The email address is not verified yet; use the link sent to it"


class UserAlreadyExists(AppError):
    status, code, detail = 409, "USER_ALREADY_EXISTS", "A user with this email or username already exists"


class MfaAlreadyEnabled(AppError):
    status, code, detail = 409, "MFA_ALREADY_ENABLED", "Multi-factor authentication is already on"


class MfaNotEnabled(AppError):
    status, code, detail = 409, "MFA_NOT_ENABLED", "Multi-factor authentication is not on"


class PayloadTooLarge(AppError):
    status, code, detail = 413, "PAYLOAD_TOO_LARGE", "Request body is larger than 64 KiB"


class UnsupportedMediaType(AppError):
    status, code, detail = 415, "UNSUPPORTED_MEDIA_TYPE", "Request body must be application/json"


class RateLimited(AppError):
    status, code, detail = 429, "RATE_LIMITED", "Too many requests"


class ServiceUnavailable(AppError):
    status, code, detail = 503, "SERVICE_UNAVAILABLE", "The database is unavailable"


class CircuitBreakerOpen(AppError):
    status, code, detail = 503, "CIRCUIT_BREAKER_OPEN", "The service is temporarily unavailable"


# Werkzeug's HTTP errors (routing, body size, ...) mapped onto the contract's codes.
_HTTP_CODES = {
    400: "VALIDATION_ERROR",
    401: "INVALID_TOKEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED",
    503: "SERVICE_UNAVAILABLE",
}
_HTTP_DETAILS = {
    400: "Bad request",
    404: "Resource not found",
    405: "Method not allowed",
    413: PayloadTooLarge.detail,
    415: UnsupportedMediaType.detail,
    429: RateLimited.detail,
}


def error_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    errors: dict[str, Any] | None = None,
) -> ResponseReturnValue:
    """Build the contract's error envelope; the one place every error body is made."""
    body: dict[str, Any] = {
        "detail": detail,
        "error_code": code,
        "timestamp": iso_now(),
        "request_id": g.request_id or "",  # observability.requests.RequestGlobals
    }
    if errors is not None:
        body["errors"] = errors
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    if status == 401 and code == "MISSING_TOKEN":
        response.headers["WWW-Authenticate"] = "Bearer"
    elif status == 401 and code in ("INVALID_TOKEN", "TOKEN_EXPIRED", "TOKEN_REVOKED"):
        response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def app_error_response(error: AppError) -> ResponseReturnValue:
    return error_response(error.status, error.code, error.detail, headers=error.headers, errors=error.errors)


def _handle_http_exception(error: HTTPException) -> ResponseReturnValue:
    status = error.code or 500
    if status >= 500:
        return _handle_unexpected(error)
    code = _HTTP_CODES.get(status, "VALIDATION_ERROR" if status < 500 else "INTERNAL_ERROR")
    detail = _HTTP_DETAILS.get(status, error.name)
    # Keep headers such as Allow (405) or Retry-After, not the HTML content type.
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return error_response(status, code, detail, headers=headers)


def _handle_unexpected(error: BaseException) -> ResponseReturnValue:
    original = getattr(error, "original_exception", None) or error
    log.error(
        "unhandled exception",
        exc_info=(type(original), original, original.__traceback__),
        extra={"event": "unhandled_exception", "exception_type": type(original).__name__},
    )
    return error_response(500, "INTERNAL_ERROR", AppError.detail)


def init_app(app: Flask) -> None:
    """Register the handlers that turn every exception into the envelope."""
    app.register_error_handler(AppError, app_error_response)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
