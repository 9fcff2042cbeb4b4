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
SESSION_LIMIT = "session_ended_by_limit"
USER_CREATED = "user_created"
USER_DEACTIVATED = "user_deactivated"
USER_ACTIVATED = "user_activated"
USER_DELETED = "user_deleted"
# Email: the flows (auth.recovery, auth.verification) and the courier (mail.courier).
PASSWORD_RESET_REQUESTED = "password_reset_requested"
PASSWORD_RESET = "password_reset"
EMAIL_VERIFICATION_REQUESTED = "email_verification_requested"
EMAIL_VERIFIED = "email_verified"
EMAIL_CHANGE_REQUESTED = "email_change_requested"
EMAIL_CHANGE_FAILED = "email_change_failed"
EMAIL_CHANGED = "email_changed"
INVALID_LINK = "invalid_link"
# Multi-factor authentication (auth.mfa).
MFA_SETUP = "mfa_setup"
MFA_CHANGE_FAILED = "mfa_change_failed"
MFA_ENABLED = "mfa_enabled"
MFA_DISABLED = "mfa_disabled"
MFA_RESET = "mfa_reset"  # an operator's reset of an account whose MFA was not on
MFA_ENABLE_FAILED = "mfa_enable_failed"
MFA_CHALLENGE_ISSUED = "mfa_challenge_issued"
MFA_CHALLENGE_FAILED = "mfa_challenge_failed"
RECOVERY_CODE_USED = "recovery_code_used"
RECOVERY_CODES_REGENERATED = "recovery_codes_regenerated"
MAIL_QUEUED = "mail_queued"
MAIL_SUPPRESSED = "mail_suppressed"
MAIL_SENT = "mail_sent"
MAIL_RETRY = "mail_retry"
MAIL_GIVEN_UP = "mail_given_up"

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
