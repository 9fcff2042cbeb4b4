"""The audit trail: one structured log event per security fact, never a secret.

Each event carries the user id and the session id when they are known; the log handler
adds the request id and the client address (observability.logs). The app's listeners
(its metrics) subscribe with `subscribe`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, has_app_context

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
USER_CREATED = "user_created"
USER_DEACTIVATED = "user_deactivated"
USER_ACTIVATED = "user_activated"

_EXTENSION = "authapp.audit"
Listener = Callable[[str, dict[str, Any]], None]


def subscribe(app: Flask, listener: Listener) -> None:
    """Call `listener(event, fields)` for every audit event of `app` (e.g. to count it)."""
    listeners = app.extensions.setdefault(_EXTENSION, [])
    if listener not in listeners:
        listeners.append(listener)


def record(event: str, *, user_id: int | None = None, sid: str | None = None, **fields: Any) -> None:
    """Log one audit event. `fields` must never hold a password, hash or token."""
    entry: dict[str, Any] = {"event": event, "audit": True, "user_id": user_id, "sid": sid, **fields}
    log.info(event, extra=entry)
    for listener in current_app.extensions.get(_EXTENSION, ()) if has_app_context() else ():
        listener(event, entry)
