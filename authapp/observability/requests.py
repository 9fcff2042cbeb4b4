"""Before/after-request hooks: the request id, the request's duration, one log line."""

from __future__ import annotations

import logging
import os
import re
import time

from flask import Response, g, request

from .logs import log_request_line

log = logging.getLogger("authapp.request")

REQUEST_ID_HEADER = "X-Request-ID"


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _incoming_request_id() -> str | None:
    """Keep a caller's request id, unchanged, only when it is a well-formed UUID."""
    raw = request.environ.get("HTTP_X_REQUEST_ID")  # the X-Request-ID header, as WSGI keeps it
    return raw if raw and _UUID.fullmatch(raw) else None


def new_request_id() -> str:
    """A random UUID (version 4) as text, as `str(uuid.uuid4())` writes it, in fewer steps."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    x = raw.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def start() -> None:
    """Stamp the request with its start time and its id (the caller's, when well formed)."""
    g.request_started = time.perf_counter()
    g.request_id = _incoming_request_id() or new_request_id()


def finish(response: Response) -> Response:
    """Send the request id back, and write the request's log line."""
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    started = g.get("request_started")
    duration_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
    log_request_line(
        log,
        {
            "event": "request",
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": duration_ms,
            "user_id": auth.user_id if (auth := g.get("auth")) is not None else None,
            "client_addr": request.remote_addr,
            "request_id": g.get("request_id"),
        },
    )
    return response
