"""Security headers for a JSON API, and a strict Content-Security-Policy that still lets
the documentation pages work with nothing but their own assets."""

from __future__ import annotations

import re

from flask import request
from flask_jwt_extended.exceptions import InvalidHeaderError, NoAuthorizationError

# JSON answers are never rendered as documents: nothing may load, frame or submit.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

# /docs and /redoc: scripts only from this origin (the Swagger UI page has no inline
# script); styles inline too, since Swagger UI and ReDoc set style attributes and inject
# <style> elements; ReDoc starts a web worker from a blob.
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_PAGES = ("/docs", "/redoc")

COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-site",
}


# Tokens and account data must not be kept by browsers or proxies.
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
_API_HEADERS = [*COMMON_HEADERS.items(), ("Content-Security-Policy", API_POLICY)]
_AUTH_HEADERS = [*_API_HEADERS, *NO_STORE]
_DOCS_HEADERS = [*COMMON_HEADERS.items(), ("Content-Security-Policy", DOCS_POLICY)]


def headers_for(path: str) -> list[tuple[str, str]]:
    """The security headers of an answer to `path` (Flask's request.path), built once:
    appended to every answer's header list as the prebuilt pairs they are (nothing else in
    the app sets them) by observability.requests.RequestObserver, instead of through
    werkzeug's Headers, which checks each name and value on every request."""
    if path in DOCS_PAGES:
        return _DOCS_HEADERS
    return _AUTH_HEADERS if path.startswith("/auth/") else _API_HEADERS


# RFC 9110 11.1: the scheme name is case-insensitive; flask-jwt-extended compares it with
# JWT_HEADER_TYPE exactly, so the scheme is written the way it expects before it reads it.
_BEARER_SCHEME = re.compile(r"[ \t]*bearer(?=[ \t])", re.IGNORECASE)


def canonical_bearer_scheme() -> None:
    """Let `bearer`, `BEARER` ... through as `Bearer` (called before a token is read)."""
    header = request.environ.get("HTTP_AUTHORIZATION")
    if header and not header.startswith("Bearer ") and _BEARER_SCHEME.match(header):
        request.environ["HTTP_AUTHORIZATION"] = _BEARER_SCHEME.sub("Bearer", header, count=1)


_FIELD_SEPARATOR = re.compile(r",\s*")


def bearer_token() -> str:
    """The token of the request's `Authorization: Bearer <token>` header, read as
    flask-jwt-extended reads it (a comma-separated list of fields may hold it, once), with
    its errors: none there is NoAuthorizationError (MISSING_TOKEN), a malformed one
    InvalidHeaderError (INVALID_TOKEN)."""
    canonical_bearer_scheme()
    header = request.environ.get("HTTP_AUTHORIZATION", "").strip().strip(",")
    if not header:
        raise NoAuthorizationError("Missing Authorization Header")
    fields = _FIELD_SEPARATOR.split(header) if "," in header else [header]
    bearer = [field for field in fields if field and field.split()[0] == "Bearer"]
    if len(bearer) != 1:
        raise NoAuthorizationError("Missing 'Bearer' type in 'Authorization' header")
    parts = bearer[0].split()
    if len(parts) != 2:
        raise InvalidHeaderError("Bad Authorization header. Expected 'Authorization: Bearer <JWT>'")
    return parts[1]
