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
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app
from flask.typing import ResponseReturnValue
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from . import settings
from .breaker import BreakerOpen, CircuitBreaker
from .errors import RateLimited, app_error_response
from .extensions import limiter
from .lograte import ThrottledLog

log = logging.getLogger("authapp.ratelimit")

_LOCKOUT = "authapp.lockout"
_LOCKOUT_BREAKER = "authapp.lockout_breaker"
# After a failed call, the lockout's storage (Redis) is not asked again for this long:
# a hung Redis then costs one login RATELIMIT_STORAGE_TIMEOUT_MS, not every login.
STORAGE_RETRY_SECONDS = 5
_throttled = ThrottledLog(log)


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


def _storage_failed(action: str, exc: Exception) -> None:
    # Failing open here still leaves the per-address limits (which fall back to memory)
    # and bcrypt's own cost between an attacker and the accounts.
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    _throttled.log(
        logging.ERROR,
        "lockout_storage_error",
        "lockout storage unavailable (%s); login allowed without the per-account check",
        reason,
        action=action,
        reason=reason,
    )


@contextmanager
def _storage_call(action: str) -> Iterator[bool]:
    """One call to the lockout's storage through its own small breaker: after a failure,
    the storage is left alone for STORAGE_RETRY_SECONDS (the block is skipped: False)."""
    breaker = current_app.extensions[_LOCKOUT_BREAKER]
    try:
        breaker.before_call()
    except BreakerOpen:
        _throttled.log(
            logging.WARNING,
            "lockout_storage_skipped",
            "lockout storage failed recently; login allowed without the per-account check",
            action=action,
        )
        yield False
        return
    try:
        yield True
    except Exception as exc:
        breaker.record_failure()
        _storage_failed(action, exc)
    else:
        breaker.record_success()


def count_attempt(key: str) -> None:
    """Count one login attempt on the account before any password is checked, or raise
    RATE_LIMITED (with Retry-After) when the window is full.

    The count is one atomic hit, so parallel guesses cannot all slip past a check made
    before any of them is counted; a successful login clears it (`clear_failures`).
    """
    strategy, item, namespace = _lockout()
    reset_at = None
    with _storage_call("hit") as reachable:
        if reachable and not strategy.hit(item, namespace, key):
            reset_at = strategy.get_window_stats(item, namespace, key).reset_time
    if reset_at is None:
        return
    retry_after = _retry_after(reset_at, item.get_expiry())
    raise RateLimited("Too many failed logins; try again later", headers={"Retry-After": retry_after})


def clear_failures(key: str) -> None:
    strategy, item, namespace = _lockout()
    with _storage_call("clear") as reachable:
        if reachable:
            strategy.clear(item, namespace, key)


def init_app(app: Flask) -> None:
    """Bind the limiter and make the lockout's counter storage."""
    limiter.init_app(app)
    app.register_error_handler(RateLimitExceeded, _handle_rate_limited)
    storage = storage_from_string(
        app.config["RATELIMIT_STORAGE_URI"], **app.config.get("RATELIMIT_STORAGE_OPTIONS", {})
    )
    app.extensions[_LOCKOUT] = MovingWindowRateLimiter(storage)
    app.extensions[_LOCKOUT_BREAKER] = CircuitBreaker(
        threshold=1, timeout=STORAGE_RETRY_SECONDS, name="lockout storage"
    )
