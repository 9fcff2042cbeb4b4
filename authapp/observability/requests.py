"""The request's observation, in one WSGI middleware around the whole app: its id, its
security headers, its duration, its Prometheus series and its one log line.

Flask request hooks cost a dispatch each and reach `request` and `g` through werkzeug's
context proxies; the middleware has the WSGI environ at hand instead. What it needs from
inside Flask comes through that environ: the request werkzeug made (`werkzeug.request`,
which werkzeug puts there: its matched url rule, path, method and client address) and the
user id the token check leaves (`USER_ID_KEY`). (The app's one request hook of its own
is the body check, `openapi.check_body`, which `openapi.init_app` registers.)
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Request, has_request_context, request
from flask.ctx import _AppCtxGlobals

from .. import database, security
from . import metrics
from .logs import log_request_line

log = logging.getLogger("authapp.request")

REQUEST_ID_HEADER = "X-Request-ID"
# Where the middleware leaves the request id for the app (the error envelope, `g.request_id`).
REQUEST_ID_KEY = "authapp.request_id"
# Where the token check leaves the caller's user id for the request's log line.
USER_ID_KEY = "authapp.user_id"

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _incoming_request_id(environ: dict[str, Any]) -> str | None:
    """Keep a caller's request id, unchanged, only when it is a well-formed UUID."""
    raw = environ.get("HTTP_X_REQUEST_ID")  # the X-Request-ID header, as WSGI keeps it
    return raw if raw and _UUID.fullmatch(raw) else None


# The RFC 4122 variant in a UUID's 17th hex digit: its top two bits set to 10, the other
# two random ("0".."f" -> "8", "9", "a", "b").
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_request_id() -> str:
    """A random UUID (version 4) as text, as `str(uuid.uuid4())` writes it, in fewer steps:
    16 random bytes as hex, the 13th digit the version (4), the 17th the variant."""
    x = os.urandom(16).hex()
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-{_VARIANT_DIGIT[x[16]]}{x[17:20]}-{x[20:]}"


class RequestGlobals(_AppCtxGlobals):
    """Flask's `g` (the app's `app_ctx_globals_class`), whose `request_id` is the one the
    middleware chose, read from the environ when asked for: the error envelope and the log
    filter ask for it, a plain request never does, so no request hook copies it over.

    Read it as `g.request_id`: `g.get("request_id")` looks at the attributes set on `g`
    only, and this one is not set."""

    @property
    def request_id(self) -> str | None:
        return request.environ.get(REQUEST_ID_KEY) if has_request_context() else None


def _werkzeug_request(environ: dict[str, Any]) -> Any:
    """The request Flask made of `environ` (werkzeug keeps it there: `populate_request`), or,
    when the app failed before making one, a shallow one with the same path, method and
    client address (and no url rule)."""
    made = environ.get("werkzeug.request")
    return made if made is not None else Request(environ, shallow=True)


class RequestObserver:
    """WSGI middleware: each request's id (the caller's X-Request-ID when a well-formed
    UUID, else a new one), its duration, its count and its log line, and the security
    headers and X-Request-ID appended to its answer's header list as prebuilt pairs.

    The count and the line are written once per request when the app starts its answer
    (`start_response`: where after-request hooks ran, before the body is sent, so a
    streamed body is not waited for), still inside Flask's contexts; or, when an exception
    escapes the app before it answered, as a 500 on its way out."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], instruments: metrics.Metrics) -> None:
        self.wsgi_app = wsgi_app
        self.metrics = instruments

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = environ[REQUEST_ID_KEY] = _incoming_request_id(environ) or new_request_id()
        database.begin_request()
        security_headers = security.headers_for("/" + environ.get("PATH_INFO", "").lstrip("/"))  # as request.path
        observed = False

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal observed
            if not observed:
                observed = True
                self.observe(environ, int(status[:3]), started, in_app=True)
            headers += security_headers
            headers.append((REQUEST_ID_HEADER, request_id))
            return start_response(status, headers, exc_info)

        try:
            return self.wsgi_app(environ, start)
        except BaseException:
            if not observed:  # the server answers it with a 500 of its own
                observed = True
                self.observe(environ, 500, started, in_app=False)
            raise

    def observe(self, environ: dict[str, Any], status: int, started: float, *, in_app: bool) -> None:
        """Count the request and write its line (`in_app`: Flask's contexts are still there,
        which publishing the pool's usage needs)."""
        now = time.perf_counter()
        made = _werkzeug_request(environ)
        rule = getattr(made, "url_rule", None)  # None too on a werkzeug request (the test client's)
        self.metrics.observe(made.method, None if rule is None else rule.rule, status, now - started, in_app=in_app)
        log_request_line(
            log,
            {
                "event": "request",
                "method": made.method,
                "path": made.path,
                "status": status,
                "duration_ms": round((now - started) * 1000, 2),
                "user_id": environ.get(USER_ID_KEY),
                "client_addr": made.remote_addr,
                "request_id": environ[REQUEST_ID_KEY],
            },
        )


def init_app(app: Flask) -> None:
    """Wrap the whole app (outermost: every request gets its id and its line, whatever the
    inner layers do), and give it the `g` that reads the request id."""
    app.app_ctx_globals_class = RequestGlobals
    app.wsgi_app = RequestObserver(app.wsgi_app, metrics.of(app))  # type: ignore[method-assign]
