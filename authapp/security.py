"""Security headers for a JSON API, and a strict Content-Security-Policy that still lets
the documentation pages work with nothing but their own assets."""

from __future__ import annotations

from flask import Response, request

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
_API_HEADERS = (*COMMON_HEADERS.items(), ("Content-Security-Policy", API_POLICY))
_DOCS_HEADERS = (*COMMON_HEADERS.items(), ("Content-Security-Policy", DOCS_POLICY))


def add_headers(response: Response) -> Response:
    """The security headers of every answer (an after-request hook)."""
    # Appended, not set: nothing else in the app sets these, and werkzeug's set/setdefault
    # scan the header list (a measurable part of a cheap request).
    path = request.path
    response.headers.extend(_DOCS_HEADERS if path in DOCS_PAGES else _API_HEADERS)
    if path.startswith("/auth/"):
        response.headers.extend(NO_STORE)
    return response
