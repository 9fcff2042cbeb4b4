"""Abuse protection: per-address limits (Flask-Limiter) and per-account login lockout.

Both keep their counters in `RATELIMIT_STORAGE_URI` (memory:// for one process, redis://
when several instances must share them). The lockout counts failed logins per account in
a moving window of `LOGIN_FAILURE_WINDOW` seconds; an identifier that names no account is
counted the same way, so a 429 never tells an existing account from a missing one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

from flask import Flask, current_app
from flask.typing import ResponseReturnValue
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from . import settings
from .errors import RateLimited, app_error_response
from .extensions import limiter

log = logging.getLogger("authapp.ratelimit")

_LOCKOUT = "authapp.lockout"


def login_limit() -> str:
    return current_app.config["LOGIN_RATE_LIMIT"]


def register_limit() -> str:
    return current_app.config["REGISTER_RATE_LIMIT"]


def refresh_limit() -> str:
    return current_app.config["REFRESH_RATE_LIMIT"]


def _retry_after(reset_at: float, window: int) -> str:
    """Whole seconds until the window lets a request through again (1 to `window`)."""
    return str(min(window, max(1, math.ceil(reset_at - time.time()))))


def _handle_rate_limited(error: RateLimitExceeded) -> ResponseReturnValue:
    window = error.limit.limit.get_expiry()
    current = limiter.current_limit
    reset_at = current.reset_at if current is not None else time.time() + window
    return app_error_response(RateLimited(headers={"Retry-After": _retry_after(reset_at, window)}))


# -- Per-account lockout ------------------------------------------------------------------


def account_key(user_id: int | None, identifier: str) -> str:
    """The counter of an account, or of an identifier that names none (hashed, not kept)."""
    if user_id is not None:
        return f"user:{user_id}"
    return "unknown:" + hashlib.sha256(identifier.strip().lower().encode()).hexdigest()


def _lockout() -> tuple[MovingWindowRateLimiter, RateLimitItemPerSecond, str]:
    current = settings.current()
    strategy = current_app.extensions[_LOCKOUT]
    item = RateLimitItemPerSecond(current.login_max_failures, current.login_failure_window)
    return strategy, item, current.ratelimit_key_prefix + "login-failures"


def _storage_failed(action: str) -> None:
    # Failing open here still leaves the per-address limits (which fall back to memory)
    # and bcrypt's own cost between an attacker and the accounts.
    log.error(
        "lockout storage unavailable; login allowed without the per-account check",
        exc_info=True,
        extra={"event": "lockout_storage_error", "action": action},
    )


def count_attempt(key: str) -> None:
    """Count one login attempt on the account before any password is checked, or raise
    RATE_LIMITED (with Retry-After) when the window is full.

    The count is one atomic hit, so parallel guesses cannot all slip past a check made
    before any of them is counted; a successful login clears it (`clear_failures`).
    """
    strategy, item, namespace = _lockout()
    try:
        if strategy.hit(item, namespace, key):
            return
        reset_at = strategy.get_window_stats(item, namespace, key).reset_time
    except Exception:
        _storage_failed("hit")
        return
    retry_after = _retry_after(reset_at, item.get_expiry())
    raise RateLimited("Too many failed logins; try again later", headers={"Retry-After": retry_after})


def clear_failures(key: str) -> None:
    strategy, item, namespace = _lockout()
    try:
        strategy.clear(item, namespace, key)
    except Exception:
        _storage_failed("clear")


def init_app(app: Flask) -> None:
    """Bind the limiter and make the lockout's counter storage."""
    limiter.init_app(app)
    app.register_error_handler(RateLimitExceeded, _handle_rate_limited)
    storage = storage_from_string(
        app.config["RATELIMIT_STORAGE_URI"], **app.config.get("RATELIMIT_STORAGE_OPTIONS", {})
    )
    app.extensions[_LOCKOUT] = MovingWindowRateLimiter(storage)
