"""Abuse protection: per-address limits (Flask-Limiter) and per-account login lockout.

The per-address limits keep their counters in `RATELIMIT_STORAGE_URI` (memory:// for one
process, redis:// when several processes or instances must share them). The lockout
counts login attempts per account in the database, which every process and instance
shares already, in a moving window of `LOGIN_FAILURE_WINDOW` seconds; an identifier that
names no account is counted the same way, so a 429 never tells an existing account from a
missing one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from datetime import timedelta

from flask import Flask, current_app
from flask.typing import ResponseReturnValue
from flask_limiter.errors import RateLimitExceeded
from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from . import clock, settings
from .database import unit_of_work
from .errors import RateLimited, app_error_response
from .extensions import limiter
from .models import LoginAttempt, LoginGuard

log = logging.getLogger("authapp.ratelimit")


def login_limit() -> str:
    return current_app.config["LOGIN_RATE_LIMIT"]


def register_limit() -> str:
    return current_app.config["REGISTER_RATE_LIMIT"]


def refresh_limit() -> str:
    return current_app.config["REFRESH_RATE_LIMIT"]


def mail_request_limit() -> str:
    """The requests that send a message (password reset, verification link)."""
    return current_app.config["MAIL_REQUEST_RATE_LIMIT"]


def _retry_after(reset_at: float, window: int) -> str:
    """Whole seconds until the window lets a request through again (1 to `window`)."""
    # The real time, not clock.now(): `reset_at` is Flask-Limiter's, on its storage's clock.
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


def _lock_account(connection: Connection, key: str) -> None:
    """Hold the account's guard row until the transaction ends, in one statement: an
    upsert, which on PostgreSQL inserts the row or takes the lock of the one there (also
    when a prune deletes it meanwhile: ON CONFLICT DO UPDATE always ends in one or the
    other), and on SQLite takes the database's write lock."""
    dialect = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
    guard = dialect(LoginGuard).values(key=key)
    connection.execute(guard.on_conflict_do_update(index_elements=[LoginGuard.key], set_={"key": guard.excluded.key}))


def count_attempt(key: str, db: Session | None = None) -> None:
    """Count one login attempt on the account before any password is checked, or raise
    RATE_LIMITED (with Retry-After) when LOGIN_MAX_FAILURES attempts fall within the last
    LOGIN_FAILURE_WINDOW seconds (a moving window; a refused attempt is not counted).
    In `db`'s transaction (a login's, which reads the user in it: one transaction fewer),
    or in one of its own; a refusal raises inside it, and so rolls it back.

    The count lives in the database, so every process and instance shares it with no
    extra service, and the check and the count happen under the account's lock, so
    parallel guesses cannot all slip past a check made before any of them is counted.
    A successful login clears it (`clear_failures`).
    """
    if db is None:
        with unit_of_work() as own:
            count_attempt(key, own)
        return
    current = settings.current()
    limit, window = current.login_max_failures, timedelta(seconds=current.login_failure_window)
    now = clock.now()
    cutoff = now - window
    connection = db.connection()  # Core statements: none of the ORM's work per statement
    _lock_account(connection, key)
    # The newest limit + 1: the ones within the window decide; an older one among them
    # means there are attempts to delete (with fewer than `limit` recent ones, the next
    # one down is among them), and none means no DELETE to send.
    newest = connection.scalars(
        select(LoginAttempt.attempted_at)
        .where(LoginAttempt.key == key)
        .order_by(LoginAttempt.attempted_at.desc())
        .limit(limit + 1)
    ).all()
    recent = [attempted_at for attempted_at in newest if attempted_at > cutoff]
    if len(recent) >= limit:
        # Open again when the oldest of the last `limit` attempts leaves the window.
        reset_at = (recent[limit - 1] + window).timestamp()
        retry_after = _retry_after(reset_at, current.login_failure_window)
        raise RateLimited("Too many failed logins; try again later", headers={"Retry-After": retry_after})
    connection.execute(insert(LoginAttempt).values(key=key, attempted_at=now))
    if len(recent) < len(newest):
        connection.execute(delete(LoginAttempt).where(LoginAttempt.key == key, LoginAttempt.attempted_at <= cutoff))


def clear_failures(key: str, db: Session | Connection | None = None) -> None:
    """Forget the account's counted attempts: in `db`'s transaction (a login's own, which
    then costs no transaction more), or in one of its own."""
    if db is not None:
        db.execute(delete(LoginAttempt).where(LoginAttempt.key == key))
        return
    with unit_of_work() as own:
        clear_failures(key, own)


def prune_attempts() -> int:
    """Delete the attempts that left the window, and the guards of accounts with none left;
    returns how many attempts were deleted."""
    now = clock.now()
    window = timedelta(seconds=settings.current().login_failure_window)
    with unit_of_work() as db:
        deleted = db.execute(delete(LoginAttempt).where(LoginAttempt.attempted_at <= now - window)).rowcount  # type: ignore[attr-defined]
        db.execute(delete(LoginGuard).where(LoginGuard.key.not_in(select(LoginAttempt.key).distinct())))
    return deleted


def _worker_processes() -> int:
    """How many worker processes serve this app, when the server says (uWSGI does)."""
    try:
        import uwsgi  # importable only inside a uWSGI worker
    except ImportError:
        return 1
    return int(getattr(uwsgi, "numproc", 1) or 1)


def warn_if_limits_are_per_process(app: Flask) -> None:
    """A production start with per-process counters under several workers: say what it costs."""
    config = app.config
    processes = _worker_processes()
    if (
        config["ENVIRONMENT"] in ("staging", "production")
        and config["RATELIMIT_ENABLED"]
        and config["RATELIMIT_STORAGE_URI"].startswith("memory://")
        and processes > 1
    ):
        log.warning(
            "RATELIMIT_STORAGE_URI=memory:// with %d worker processes: each process counts the "
            "per-address limits on its own, so a client gets up to %d times LOGIN_RATE_LIMIT, "
            "REGISTER_RATE_LIMIT and REFRESH_RATE_LIMIT (the per-account lockout is shared "
            "through the database and is not affected); set RATELIMIT_STORAGE_URI=redis://...",
            processes,
            processes,
            extra={"event": "ratelimit_storage_per_process", "processes": processes},
        )


def init_app(app: Flask) -> None:
    """Bind the limiter; warn when its counters cannot be shared by the workers."""
    limiter.init_app(app)
    app.register_error_handler(RateLimitExceeded, _handle_rate_limited)
    warn_if_limits_are_per_process(app)
