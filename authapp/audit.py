"""The audit trail: one structured log event per security fact, never a secret.

Each event carries the request id, the user id, the session id and the client address
when they are known. Listeners (metrics) may subscribe with `subscribe`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import g, has_request_context, request

log = logging.getLogger("authapp.audit")

REGISTER = "register"
LOGIN_SUCCESS = "login_success"
LOGIN_FAILURE = "login_failure"
LOGIN_LOCKED = "login_locked"
REFRESH = "refresh"
REFRESH_REPLAY = "refresh_replay_within_interval"
REUSE_DETECTED = "refresh_reuse_detected"
LOGOUT = "logout"
LOGOUT_ALL = "logout_all"
LOGOUT_TOKEN_IGNORED = "logout_refresh_token_ignored"
PASSWORD_CHANGED = "password_changed"
PASSWORD_CHANGE_FAILED = "password_change_failed"
SESSION_REVOKED = "session_revoked"
SESSION_LIMIT = "session_ended_by_limit"
USER_CREATED = "user_created"
USER_DEACTIVATED = "user_deactivated"
USER_ACTIVATED = "user_activated"

_listeners: list[Callable[[str, dict[str, Any]], None]] = []


def subscribe(listener: Callable[[str, dict[str, Any]], None]) -> None:
    """Call `listener(event, fields)` for every audit event (e.g. to count it)."""
    if listener not in _listeners:
        _listeners.append(listener)


def record(event: str, *, user_id: int | None = None, sid: str | None = None, **fields: Any) -> None:
    """Log one audit event. `fields` must never hold a password, hash or token."""
    entry: dict[str, Any] = {"event": event, "audit": True, "user_id": user_id, "sid": sid, **fields}
    if has_request_context():
        entry["client_addr"] = request.remote_addr
        if user_id is not None:
            g.user_id = user_id
    log.info(event, extra=entry)
    for listener in _listeners:
        listener(event, entry)
