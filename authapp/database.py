"""The one session scope through which every unit of work reaches the database,
guarded by the process's circuit breaker, and the engine's behaviour when the database
is slow, hung or gone: deadlines on PostgreSQL I/O, no connection across a fork."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import select
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from functools import cache
from typing import Any, cast

from flask import Flask, current_app, has_request_context
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from .breaker import BreakerOpen, CircuitBreaker
from .errors import CircuitBreakerOpen, ServiceUnavailable
from .extensions import db
from .lograte import ThrottledLog
from .probe import DatabaseProbe

log = logging.getLogger("authapp.database")

RETRY_AFTER_SECONDS = "5"
_EXTENSION = "authapp.breaker"
_PROBE = "authapp.probe"
# An outage repeats the same error on every request: one line per event and interval.
_throttled = ThrottledLog(log)
_in_unit_of_work: ContextVar[bool] = ContextVar("authapp_in_unit_of_work", default=False)
# Whether the request being handled (in this thread) went through the breaker; reset by
# `begin_request` at the start of each request.
_used_in_request: ContextVar[bool] = ContextVar("authapp_used_in_request", default=False)
# Every engine this process made, so that a forked child can drop what it inherited.
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


# SQLSTATE 25006 read_only_sql_transaction: a standby after a failover, or
# default_transaction_read_only. For the client it is an outage like a lost connection.
READ_ONLY_SQLSTATE = "25006"
# undefined_table, undefined_column: the schema is older than the code (never migrated).
SCHEMA_SQLSTATES = ("42P01", "42703")
_SQLITE_SCHEMA_ERRORS = ("no such table", "no such column", "has no column named")
UPGRADE_HINT = "run `flask --app wsgi db upgrade`"


class WritesRefused(ServiceUnavailable):
    """503 SERVICE_UNAVAILABLE: the database is read-only (a failover to a standby)."""

    detail = "The database refuses writes (read-only); try again later"


class SchemaOutdated(ServiceUnavailable):
    """503 SERVICE_UNAVAILABLE: the database's schema is older than the code."""

    detail = "The database schema is not up to date"


def _driver_error(exc: BaseException) -> BaseException:
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def sqlstate(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of a driver error (None for SQLite and client-side errors)."""
    return getattr(_driver_error(exc), "pgcode", None)


def describe(exc: BaseException) -> str:
    """The driver's own message, one line, for a log or the CLI: "FATAL: sorry, too many
    clients already", "database "x" does not exist", "connection refused".

    Only the server's primary message or the first line of libpq's: never the statement
    or its parameters (SQLAlchemy's message carries the statement)."""
    orig = _driver_error(exc)
    diag = getattr(orig, "diag", None)
    message = getattr(diag, "message_primary", None) if diag is not None else None
    if not message:
        text_ = str(orig).strip() or type(orig).__name__
        message = text_.splitlines()[0].strip()
        if isinstance(exc, DBAPIError) and orig is exc:  # SQLAlchemy's own: drop the SQL
            message = message.split(" [SQL:", 1)[0]
    return message[:300]


def is_read_only_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and sqlstate(exc) == READ_ONLY_SQLSTATE


def is_schema_error(exc: BaseException) -> bool:
    """The database answered that a table or column of the models is missing."""
    if not isinstance(exc, DBAPIError):
        return False
    if sqlstate(exc) in SCHEMA_SQLSTATES:
        return True
    orig = exc.orig
    return type(orig).__module__ == "sqlite3" and str(orig).startswith(_SQLITE_SCHEMA_ERRORS)


def is_connectivity_error(exc: BaseException) -> bool:
    """A failure to reach the database, as opposed to a query the database refused; a
    database that refuses writes (read-only) counts as unreachable."""
    if is_read_only_error(exc):
        return True
    if is_schema_error(exc):
        return False  # SQLite reports "no such table" as an OperationalError
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeoutError, DisconnectionError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def breaker_of(app: Flask) -> CircuitBreaker:
    """The app's circuit breaker (one per process and app)."""
    return app.extensions[_EXTENSION]


def breaker() -> CircuitBreaker:
    """The circuit breaker of the current app."""
    return current_app.extensions[_EXTENSION]


def probe() -> DatabaseProbe:
    return current_app.extensions[_PROBE]


def _log_database_error(exc: BaseException) -> None:
    _throttled.log(
        logging.ERROR,
        "database_error",
        "database unavailable: %s",
        describe(exc),
        error=type(exc).__name__,
        sqlstate=sqlstate(exc),
        reason=describe(exc),
    )


def begin_request() -> None:
    """Forget whether an earlier request of this thread used the database (a request hook)."""
    _used_in_request.set(False)


def used_database() -> bool:
    """Whether the current request went through the breaker to the database."""
    return _used_in_request.get()


class _through_breaker:  # noqa: N801  (used as `with _through_breaker():`, as a function would be)
    """Run a block that reaches the database through the breaker, with its failures in
    the envelope: an open breaker answers 503 CIRCUIT_BREAKER_OPEN without touching the
    database; losing the database answers 503 SERVICE_UNAVAILABLE; any other error
    propagates.

    The breaker through its public calls (`before_call`, `record_success`,
    `record_failure`: what its `guard()` does) in a plain context manager: every request
    that reads a session passes here, and two generator-based context managers cost more
    than the calls themselves."""

    __slots__ = ("_breaker", "_scope")

    def __enter__(self) -> None:
        self._breaker = current_app.extensions[_EXTENSION]
        _used_in_request.set(True)
        try:
            self._breaker.before_call()
        except BreakerOpen as exc:
            # The probe checks again well before the breaker's own timeout: say so.
            retry_after = min(exc.retry_after, probe().retry_after())
            raise CircuitBreakerOpen(headers={"Retry-After": str(retry_after)}) from None
        self._scope = _in_unit_of_work.set(True)

    def __exit__(self, _type: Any, exc: BaseException | None, _traceback: Any) -> None:
        _in_unit_of_work.reset(self._scope)
        if exc is None:
            self._breaker.record_success()
            return
        if is_connectivity_error(exc):
            self._breaker.record_failure()
        else:
            self._breaker.record_success()
        if not isinstance(exc, Exception):
            return  # KeyboardInterrupt, GeneratorExit...: as they are
        if is_read_only_error(exc):
            # Reads still succeed and would reset the count: every write fails until the
            # database takes writes again (the probe checks that).
            self._breaker.trip()
            _log_database_error(exc)
            raise WritesRefused(headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc
        if is_connectivity_error(exc):
            _log_database_error(exc)
            raise ServiceUnavailable(headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc
        if is_schema_error(exc):
            _throttled.log(
                logging.ERROR,
                "database_schema_error",
                "the database schema is older than the code (%s); %s",
                describe(exc),
                UPGRADE_HINT,
                sqlstate=sqlstate(exc),
            )
            raise SchemaOutdated(headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc


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
def core_unit_of_work() -> Iterator[Connection]:
    """`unit_of_work` for a flow that reads and writes with Core statements only: one
    transaction through the breaker on a Connection of the app's engine, committed when
    the block ends, rolled back when it raises. No ORM Session (its transaction states,
    connection lookup, flush and teardown): on a refresh they cost more than its two
    statements' own work. The Connection's events run as for a Session's (the statement
    timeout, the scope check)."""
    with _through_breaker(), db.engine.begin() as connection:
        yield connection


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


# -- One read statement, prepared once per connection ------------------------------------
#
# A statement run on every request (the session check) is parsed and planned by
# PostgreSQL each time it arrives as text. Prepared once on each pooled connection
# (PREPARE, in the same message as its first EXECUTE), later requests send only EXECUTE
# with the parameters. The statement timeout still reaches it: it is the first statement
# of its (autocommit) transaction, so `_bound_each_transaction` prefixes it.
#
# PgBouncer in transaction mode hands each transaction to any server connection, where a
# statement prepared on another is missing (26000) or one of ours is there already
# (42P05): the engine then stops preparing (one warning) and sends the plain statement
# from then on, this request included. (PgBouncer's own prepared statement
# support, from 1.21, is for protocol-level statements, not SQL PREPARE.) SQLite runs the
# plain statement: one local file, nothing to save.
_PREPARED = "authapp_prepared_statements"
_PREPARED_ALREADY = "42P05"  # duplicate_prepared_statement
_PREPARED_GONE = ("26000", _PREPARED_ALREADY)  # invalid_sql_statement_name, or it is someone else's
_unprepared_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


class PreparedRead:
    """A read statement written with `:name` parameters (SQLite's and SQLAlchemy's style),
    run as a prepared statement on PostgreSQL and as it is on SQLite. Rows are tuples.

    `fetch` runs it on a pooled connection's own driver: no SQLAlchemy Connection, result
    or event per call (on a GET /auth/me that machinery cost more than the statement's
    own round trip). What a Connection would have done for it is done here: the breaker
    and its error mapping (`_through_breaker`), the statement timeout (prefixed, as
    `_bound_each_transaction` does), autocommit (`_autocommit`), and on a driver error the
    same `DBAPIError` SQLAlchemy raises, with a lost connection invalidated (`_driver_error_of`).
    """

    def __init__(self, name: str, sql: str) -> None:
        self.sql = sql
        self.parameters = tuple(dict.fromkeys(_PARAMETER.findall(sql)))
        # The text's hash in the name: another release's statement is never taken for this one.
        self.name = f"{name}_{hashlib.sha256(sql.encode()).hexdigest()[:10]}"
        position = {name: index for index, name in enumerate(self.parameters, 1)}
        self.prepare = f"PREPARE {self.name} AS " + _PARAMETER.sub(lambda m: f"${position[m[1]]}", sql)
        self.execute = f"EXECUTE {self.name} (" + ", ".join(f"%({p})s" for p in self.parameters) + ")"
        self.plain = _PARAMETER.sub(lambda m: f"%({m[1]})s", sql)  # psycopg2's style

    def fetch(self, engine: Engine, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The statement's rows, through the breaker, on a connection of `engine`'s pool
        (the app's: `db.engine`)."""
        with _through_breaker():
            pooled = _checkout(engine)
            try:
                if engine.dialect.name != "postgresql":
                    return _run(engine, pooled, self.sql, parameters)  # SQLite: one local file
                with _autocommit(engine, pooled):
                    return self._fetch_prepared(engine, pooled, parameters)
            finally:
                pooled.close()  # back to the pool (an invalidated one is dropped)

    def _fetch_prepared(self, engine: Engine, pooled: Any, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        # Its own transaction (autocommit): the timeout prefix goes on every statement.
        prefix = _transaction_prefix.get(engine, "")
        if engine in _unprepared_engines:
            return _run(engine, pooled, prefix + self.plain, parameters)
        prepared: set[str] = pooled.info.setdefault(_PREPARED, set())
        first = self.name not in prepared
        statement = f"{prefix}{self.prepare}; {self.execute}" if first else prefix + self.execute
        try:
            rows = _run(engine, pooled, statement, parameters)
        except DBAPIError as exc:
            state = sqlstate(exc)
            if state not in _PREPARED_GONE:
                raise
            if first and state == _PREPARED_ALREADY:
                # A PREPARE outlives the failure of the EXECUTE sent with it (a timeout):
                # the statement of this name is there already, the same text.
                prepared.add(self.name)
                return _run(engine, pooled, prefix + self.execute, parameters)
            self._stop_preparing(engine, exc)
            return _run(engine, pooled, prefix + self.plain, parameters)
        prepared.add(self.name)
        return rows

    @staticmethod
    def _stop_preparing(engine: Engine, exc: BaseException) -> None:
        _unprepared_engines.add(engine)
        log.warning(
            "prepared statements off: a statement prepared on this connection is gone (%s); "
            "a pooler in transaction mode?",
            describe(exc),
            extra={"event": "database_prepared_statements_off", "sqlstate": sqlstate(exc)},
        )


def _checkout(engine: Engine) -> Any:
    """A connection of the engine's pool (its checkout events run: the idle ping), with a
    failure to connect raised as SQLAlchemy raises it from `engine.connect()`."""
    try:
        return engine.raw_connection()
    except engine.dialect.loaded_dbapi.Error as exc:
        raise _driver_error_of(engine, None, exc, None) from exc


@contextmanager
def _autocommit(engine: Engine, pooled: Any) -> Iterator[None]:
    """psycopg2's client-side autocommit for the block (see `autocommit_read`); a
    connection that cannot be switched back (it died) is dropped from the pool."""
    driver = pooled.driver_connection
    try:
        driver.autocommit = True
    except engine.dialect.loaded_dbapi.Error as exc:  # psycopg2 knows it is closed
        pooled.invalidate(exc)
        raise DisconnectionError("a pooled connection was closed") from exc
    try:
        yield
    finally:
        try:
            driver.autocommit = False
        except engine.dialect.loaded_dbapi.Error:
            if pooled.is_valid:  # not yet invalidated by the statement's own failure
                pooled.invalidate()


def _run(engine: Engine, pooled: Any, statement: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One statement on the driver's own cursor; a driver error as SQLAlchemy raises it."""
    cursor = pooled.driver_connection.cursor()
    try:
        cursor.execute(statement, parameters)
        return cursor.fetchall()
    except engine.dialect.loaded_dbapi.Error as exc:
        raise _driver_error_of(engine, pooled, exc, cursor) from exc
    finally:
        with suppress(engine.dialect.loaded_dbapi.Error):
            cursor.close()


def _driver_error_of(engine: Engine, pooled: Any, exc: Exception, cursor: Any) -> DBAPIError:
    """The `DBAPIError` SQLAlchemy's Connection makes of a driver error. On a lost
    connection, as SQLAlchemy does, that connection is invalidated and so are the others
    of the pool opened before it, since the server that held them is likely gone too."""
    driver = None if pooled is None else pooled.driver_connection
    disconnect = engine.dialect.is_disconnect(exc, driver, cursor)  # type: ignore[arg-type]  # a DB-API Error
    if disconnect and pooled is not None:
        # As SQLAlchemy's Connection does (Pool._invalidate, SQLAlchemy 2.1 as pinned):
        # this connection now, and every other opened before it at its next checkout.
        # (engine.dispose() would leave the ones other requests hold outside any pool.)
        engine.pool._invalidate(pooled, exc)
    return cast(
        DBAPIError,
        DBAPIError.instance(
            None,
            None,
            exc,
            engine.dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=disconnect,
            dialect=engine.dialect,
        ),
    )


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


# -- Per-session and per-transaction settings, without a startup `options` parameter ---
#
# PgBouncer refuses libpq's startup `options`, and in transaction mode a session-level SET
# reaches only whichever server connection ran it. So the statement timeout travels with
# each transaction: `SET LOCAL statement_timeout` is prepended to the transaction's first
# statement, in the same message (PostgreSQL runs a multi-statement message as one
# transaction, in autocommit mode too), so it costs no round trip. The idle timeout is a
# session setting, sent once per new connection.
_TIMEOUT_PENDING = "authapp_statement_timeout_pending"
# Each engine's prefix, for the statements sent on the driver's own cursor (PreparedRead).
_transaction_prefix: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def _bound_each_transaction(engine: Engine, statement_ms: int) -> None:
    prefix = _transaction_prefix[engine] = f"SET LOCAL statement_timeout = {int(statement_ms)}; "

    def began(conn: Connection) -> None:
        conn.info[_TIMEOUT_PENDING] = True

    def bound(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if not executemany and conn.info.pop(_TIMEOUT_PENDING, False):
            statement = prefix + statement
        return statement, parameters

    event.listen(engine, "begin", began)
    event.listen(engine, "before_cursor_execute", bound, retval=True)


def _close_when_idle(engine: Engine, idle_seconds: int) -> None:
    statement = f"SET idle_session_timeout = {int(idle_seconds) * 1000}"
    unsupported: list[str] = []  # PostgreSQL before 14 has no idle_session_timeout

    def connected(dbapi_connection: Any, _record: Any) -> None:
        if unsupported:
            return
        # Autocommit (a client-side switch in psycopg2): one round trip, no BEGIN/COMMIT.
        dbapi_connection.autocommit = True
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(statement)
        except engine.dialect.loaded_dbapi.ProgrammingError as exc:
            unsupported.append(describe(exc))
            log.warning(
                "idle connections are not closed by the server: %s",
                unsupported[0],
                extra={"event": "database_idle_timeout_off", "reason": unsupported[0]},
            )
        finally:
            dbapi_connection.autocommit = False

    event.listen(engine, "connect", connected)


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


# -- Is the database back? ------------------------------------------------------------


class DatabaseReadOnly(Exception):
    """The database answers but refuses writes (a standby, default_transaction_read_only)."""


READ_ONLY_QUERY = text("SELECT current_setting('transaction_read_only')")


def raise_if_read_only(connection: Connection) -> None:
    """One statement: raise DatabaseReadOnly when this connection's transactions cannot write."""
    if connection.dialect.name != "postgresql":
        connection.execute(text("SELECT 1"))
    elif connection.execute(READ_ONLY_QUERY).scalar_one() == "on":
        raise DatabaseReadOnly("the database is read-only (transaction_read_only is on)")


def _probe_check(engine: Engine) -> Callable[[], None]:
    def check() -> None:
        with engine.connect() as connection:
            try:
                raise_if_read_only(connection)
            except DatabaseReadOnly:
                # A session keeps the read-only default it started with: ask a new one next.
                connection.invalidate()
                raise

    return check


def _describe_probe_failure(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DatabaseReadOnly) else describe(exc)


def init_app(app: Flask) -> None:
    """Create the process's breaker and its probe, and bind the SQLAlchemy extension."""
    breaker = app.extensions[_EXTENSION] = CircuitBreaker(
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
                if app.config["DATABASE_STATEMENT_TIMEOUT_MS"]:
                    _bound_each_transaction(engine, app.config["DATABASE_STATEMENT_TIMEOUT_MS"])
                if app.config["DATABASE_IDLE_TIMEOUT"]:
                    _close_when_idle(engine, app.config["DATABASE_IDLE_TIMEOUT"])
        engine = db.engine
    max_interval = min(app.config["CIRCUIT_BREAKER_TIMEOUT"], app.config["CIRCUIT_BREAKER_PROBE_INTERVAL_MS"] / 1000)
    app.extensions[_PROBE] = DatabaseProbe(
        breaker,
        _probe_check(engine),
        max_interval,
        describe=_describe_probe_failure,
        # Connections from before the outage are suspect: the next requests get new ones.
        on_recovered=engine.dispose,
    )
