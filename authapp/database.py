"""The one session scope through which every unit of work reaches the database,
guarded by the process's circuit breaker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from .breaker import BreakerOpen, CircuitBreaker
from .errors import CircuitBreakerOpen, ServiceUnavailable
from .extensions import db

log = logging.getLogger("authapp.database")

RETRY_AFTER_SECONDS = "5"
_EXTENSION = "authapp.breaker"


def is_connectivity_error(exc: BaseException) -> bool:
    """A failure to reach the database, as opposed to a query the database refused."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def breaker() -> CircuitBreaker:
    return current_app.extensions[_EXTENSION]


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """One transaction through the breaker: committed when the block ends, rolled back
    when it raises.

    An open breaker answers 503 CIRCUIT_BREAKER_OPEN without touching the database;
    losing the database answers 503 SERVICE_UNAVAILABLE; any other error propagates
    after the rollback.
    """
    session = db.session
    try:
        with breaker().guard():
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
    except BreakerOpen as exc:
        raise CircuitBreakerOpen(headers={"Retry-After": str(exc.retry_after)}) from None
    except Exception as exc:
        if is_connectivity_error(exc):
            log.error("database unavailable", extra={"event": "database_error", "error": type(exc).__name__})
            raise ServiceUnavailable(headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc
        raise


def init_app(app: Flask) -> None:
    """Create the process's breaker and bind the SQLAlchemy extension."""
    app.extensions[_EXTENSION] = CircuitBreaker(
        threshold=app.config["CIRCUIT_BREAKER_THRESHOLD"],
        timeout=app.config["CIRCUIT_BREAKER_TIMEOUT"],
        half_open_max_calls=app.config["CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS"],
        is_failure=is_connectivity_error,
    )
    db.init_app(app)
