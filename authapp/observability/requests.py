"""Before/after-request hooks: the request id, the request's duration, one log line."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Response, g, request

log = logging.getLogger("authapp.request")

REQUEST_ID_HEADER = "X-Request-ID"


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _incoming_request_id() -> str | None:
    """Keep a caller's request id, unchanged, only when it is a well-formed UUID."""
    raw = request.headers.get(REQUEST_ID_HEADER, "")
    return raw if _UUID.fullmatch(raw) else None


def start() -> None:
    """Stamp the request with its start time and its id (the caller's, when well formed)."""
    g.request_started = time.perf_counter()
    g.request_id = _incoming_request_id() or str(uuid.uuid4())


def finish(response: Response) -> Response:
    """Send the request id back, and write the request's log line."""
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    started = g.get("request_started")
    duration_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
    log.info(
        "request",
        extra={
            "event": "request",
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": duration_ms,
            "user_id": auth.user_id if (auth := g.get("auth")) is not None else None,
            "client_addr": request.remote_addr,
        },
    )
    return response
