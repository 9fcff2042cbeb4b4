"""The one session scope through which every unit of work reaches the database,
guarded by the process's circuit breaker, and the engine's behaviour when the database
is slow, hung or gone: deadlines on PostgreSQL I/O, no connection across a fork."""

from __future__ import annotations

import logging
import os
import select
import socket
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any, cast

from flask import Flask, current_app, has_request_context
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from .breaker import BreakerOpen, CircuitBreaker
from .errors import CircuitBreakerOpen, ServiceUnavailable
from .extensions import db

log = logging.getLogger("authapp.database")

RETRY_AFTER_SECONDS = "5"
_EXTENSION = "authapp.breaker"
_in_unit_of_work: ContextVar[bool] = ContextVar("authapp_in_unit_of_work", default=False)
# Whether the request being handled (in this thread) went through the breaker; reset by
# `begin_request` at the start of each request.
_used_in_request: ContextVar[bool] = ContextVar("authapp_used_in_request", default=False)
# Every engine this process made, so that a forked child can drop what it inherited.
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def is_connectivity_error(exc: BaseException) -> bool:
    """A failure to reach the database, as opposed to a query the database refused."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError, DisconnectionError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def breaker_of(app: Flask) -> CircuitBreaker:
    """The app's circuit breaker (one per process and app)."""
    return app.extensions[_EXTENSION]


def breaker() -> CircuitBreaker:
    """The circuit breaker of the current app."""
    return current_app.extensions[_EXTENSION]


def begin_request() -> None:
    """Forget whether an earlier request of this thread used the database (a request hook)."""
    _used_in_request.set(False)


def used_database() -> bool:
    """Whether the current request went through the breaker to the database."""
    return _used_in_request.get()


@contextmanager
def _through_breaker() -> Iterator[None]:
    """Run a block that reaches the database through the breaker, with its failures in
    the envelope: an open breaker answers 503 CIRCUIT_BREAKER_OPEN without touching the
    database; losing the database answers 503 SERVICE_UNAVAILABLE; any other error
    propagates."""
    scope = _in_unit_of_work.set(True)
    _used_in_request.set(True)
    try:
        with breaker().guard():
            yield
    except BreakerOpen as exc:
        raise CircuitBreakerOpen(headers={"Retry-After": str(exc.retry_after)}) from None
    except Exception as exc:
        if is_connectivity_error(exc):
            log.error("database unavailable", extra={"event": "database_error", "error": type(exc).__name__})
            raise ServiceUnavailable(headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc
        raise
    finally:
        _in_unit_of_work.reset(scope)


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """One transaction through the breaker: committed when the block ends, rolled back
    when it raises (errors as in `_through_breaker`)."""
    session = cast(Session, db.session)  # the scoped session proxies the request's Session
    with _through_breaker():
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def autocommit_read() -> Iterator[Connection]:
    """A connection for one read statement outside any transaction, through the breaker.

    The per-request session check is one SELECT: in a transaction it would cost two more
    round trips to PostgreSQL (BEGIN and COMMIT) than the statement itself. psycopg2's
    autocommit switch is client-side (no round trip either way), unlike SQLAlchemy's
    isolation_level="AUTOCOMMIT", whose reset when the connection returns to the pool
    costs one. A connection that cannot be switched back (it died) is dropped from the
    pool, never handed out again.
    """
    with _through_breaker(), db.engine.connect() as connection:
        driver: Any = connection.connection.driver_connection
        if not hasattr(driver, "autocommit") or connection.dialect.name != "postgresql":
            yield connection  # SQLite: one local file, no round trips to save
            return
        try:
            driver.autocommit = True
        except connection.dialect.loaded_dbapi.Error as exc:  # psycopg2 knows it is closed
            connection.invalidate()
            raise DisconnectionError("a pooled connection was closed") from exc
        try:
            yield connection
        finally:
            try:
                driver.autocommit = False
            except connection.dialect.loaded_dbapi.Error:
                connection.invalidate()


def _check_scope(conn, cursor, statement, parameters, context, executemany) -> None:
    """A request that reaches the database outside `unit_of_work()` bypasses the breaker."""
    if has_request_context() and not _in_unit_of_work.get():
        log.error("database used outside unit_of_work()", extra={"event": "database_outside_unit_of_work"})


# -- Deadlines on PostgreSQL I/O ------------------------------------------------------
#
# libpq waits forever for a server that accepted a connection and then went silent (a
# frozen server, a network that drops packets): statement_timeout is enforced by the
# server, so it cannot help, and TCP keepalives cannot tell a frozen process from an idle
# one. psycopg2 lets a "wait callback" do every wait on the socket; this one gives each
# wait a deadline and, when it passes, shuts the socket down, so that libpq reports a lost
# connection, psycopg2 marks it closed and SQLAlchemy drops it from the pool. Only
# connections made by `deadline_connection()` classes get a deadline; any other
# psycopg2 connection in the process waits as before.


def _wait_with_deadline(conn: Any, *_: Any) -> None:
    import psycopg2.extensions as pg

    established = conn.status in (pg.STATUS_READY, pg.STATUS_BEGIN, pg.STATUS_PREPARED)
    timeout = getattr(conn, "io_timeout" if established else "connect_timeout", None)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = conn.poll()
        if state == pg.POLL_OK:
            return
        if state not in (pg.POLL_READ, pg.POLL_WRITE):
            raise conn.OperationalError(f"bad state from poll: {state}")
        # poll(), not select(): a busy worker may hold descriptors above FD_SETSIZE.
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN if state == pg.POLL_READ else select.POLLOUT)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        if not poller.poll(remaining):
            log.error(
                "database did not answer within %ss; dropping the connection",
                timeout,
                extra={"event": "database_timeout", "phase": "query" if established else "connect"},
            )
            # Shut down our side: the next poll() fails as a lost connection would.
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            deadline = None


@cache
def deadline_connection(connect_timeout: float, io_timeout: float | None) -> type:
    """A psycopg2 connection class whose waits end after `connect_timeout` seconds while
    connecting and `io_timeout` seconds per operation after that (None: no limit)."""
    import psycopg2.extensions as pg

    return type(
        "DeadlineConnection",
        (pg.connection,),
        {"connect_timeout": connect_timeout, "io_timeout": io_timeout, "__module__": __name__},
    )


def _install_wait_callback() -> None:
    import psycopg2.extensions as pg

    current = pg.get_wait_callback()
    if current is None:
        pg.set_wait_callback(_wait_with_deadline)
    elif current is not _wait_with_deadline:
        log.warning(
            "another psycopg2 wait callback is installed (gevent?); database deadlines are off",
            extra={"event": "database_deadlines_off"},
        )


def _apply_deadlines(app: Flask) -> None:
    """Give the PostgreSQL engine's connections their deadlines (SQLite has no network)."""
    options = app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {})
    url = make_url(app.config["SQLALCHEMY_DATABASE_URI"])
    if url.get_backend_name() != "postgresql" or url.get_driver_name() != "psycopg2":
        return
    connect_timeout = app.config["DATABASE_CONNECT_TIMEOUT"]
    statement_ms = app.config["DATABASE_STATEMENT_TIMEOUT_MS"]
    # The server cancels a slow statement first (a clean error, the connection kept);
    # the client gives up only when the server has not answered even that.
    io_timeout = statement_ms / 1000 + connect_timeout if statement_ms else None
    connect_args = options.setdefault("connect_args", {})
    connect_args.setdefault("connection_factory", deadline_connection(connect_timeout, io_timeout))
    _install_wait_callback()


# -- Pooled connections that died while idle ---------------------------------------------
#
# A connection can die while it waits in the pool: the server restarted, a firewall or
# idle_session_timeout closed it. SQLAlchemy's pool_pre_ping tests every connection at
# every checkout, which is one more round trip on every request: under load, as much as
# the per-request session check itself. Only a connection that waited in the pool longer
# than PING_AFTER_IDLE_SECONDS is tested here; one in steady use is not. When the server
# restarts under steady traffic, the first statement on each pooled connection fails
# instead (503 SERVICE_UNAVAILABLE, like the requests in flight at that moment); SQLAlchemy
# then drops every connection opened before the failure, and the requests after it get
# new ones.
PING_AFTER_IDLE_SECONDS = 1.0
_CHECKED_IN_AT = "authapp_checked_in_at"


def _ping_idle_connections(engine: Engine) -> None:
    def checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop(_CHECKED_IN_AT, None)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool drops this connection and checks out another (or opens one).
            raise DisconnectionError("a pooled connection died while idle") from exc

    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checked_out)


# -- Fork safety ----------------------------------------------------------------------


def dispose_after_fork() -> None:
    """In a forked child, forget the pooled connections inherited from the parent without
    closing them (they are the parent's), so that the child opens its own.

    Runs by itself after `os.fork()` (gunicorn, multiprocessing); under uWSGI without
    `lazy-apps`, call it from a `uwsgidecorators.postfork` hook.
    """
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=dispose_after_fork)


def init_app(app: Flask) -> None:
    """Create the process's breaker and bind the SQLAlchemy extension."""
    app.extensions[_EXTENSION] = CircuitBreaker(
        threshold=app.config["CIRCUIT_BREAKER_THRESHOLD"],
        timeout=app.config["CIRCUIT_BREAKER_TIMEOUT"],
        half_open_max_calls=app.config["CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS"],
        is_failure=is_connectivity_error,
    )
    _apply_deadlines(app)
    db.init_app(app)
    with app.app_context():
        for engine in db.engines.values():
            _engines.add(engine)
            event.listen(engine, "before_cursor_execute", _check_scope)
            if engine.dialect.name == "postgresql":
                _ping_idle_connections(engine)
