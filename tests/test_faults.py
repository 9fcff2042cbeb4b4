"""Faults against a real PostgreSQL, through a TCP proxy each test controls: the database
goes away, hangs, or loses an answer mid-traffic; the breaker opens, /health says so, and
when the database is back the service recovers with no restart and nothing lost.

The registration invariant (test_nothing_lost_...), for every POST /auth/register sent:
- every request is answered: 201, or 503 in the envelope with Retry-After; nothing else;
- 201 => its user is in the database, whole, with the id the client was given;
- 503 CIRCUIT_BREAKER_OPEN => its user is not (refused before any write);
- 503 SERVICE_UNAVAILABLE => its user is in the database only when the connection broke
  after the COMMIT was sent (the server committed, the answer was lost), and then whole;
- every user in the database was sent by a request that got 201 or SERVICE_UNAVAILABLE.
"Whole": the email and username sent, is_active, created_at, and a bcrypt hash that
verifies the password sent. test_a_commit_whose_answer_is_lost_... makes the
"answer lost" case happen on purpose.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from helpers import (
    PASSWORD,
    TIMESTAMP_RE,
    UUID_RE,
    assert_error,
    base_settings,
    bearer,
    http,
    live_server,
    wait_until,
)
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from authapp import create_app, database
from authapp.auth.passwords import verify_password
from authapp.errors import ServiceUnavailable
from authapp.extensions import db
from authapp.models import User
from config import ConfigError, load_settings
from devtools.proxy import TcpProxy

FAULT_SETTINGS = {
    "CIRCUIT_BREAKER_THRESHOLD": 3,
    "CIRCUIT_BREAKER_TIMEOUT": 1,
    "DATABASE_CONNECT_TIMEOUT": 1,
    "DATABASE_STATEMENT_TIMEOUT_MS": 1000,
}
# A statement on a pooled connection that goes silent is given up after statement timeout
# + connect timeout (2 s). (The connection was in use a moment before, so it is not pinged
# first: authapp.database.PING_AFTER_IDLE_SECONDS.)
HUNG_POOLED_SECONDS = 2.0
SLACK = 1.5
UNAVAILABLE = (503, "SERVICE_UNAVAILABLE")
BREAKER_OPEN = (503, "CIRCUIT_BREAKER_OPEN")
PROBE_THREAD = "authapp-database-probe"


# -- Fixtures ---------------------------------------------------------------------------


@dataclass
class Fault:
    """An app whose every database connection goes through `proxy`."""

    app: Flask
    proxy: TcpProxy
    direct_url: str
    transitions: list[tuple[str, str]] = field(default_factory=list)

    def state(self) -> str:
        with self.app.app_context():
            return database.breaker().state.value

    def count(self, old: str, new: str) -> int:
        return self.transitions.count((old, new))


@pytest.fixture
def proxy(pg_database_url) -> Iterator[TcpProxy]:
    url = make_url(pg_database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy
    proxy.close()
    assert proxy.threads() == [], "the proxy left a thread behind"


@pytest.fixture
def make_fault(pg_database_url, proxy) -> Iterator[Callable[..., Fault]]:
    apps: list[Flask] = []

    def make(**overrides: Any) -> Fault:
        proxied = make_url(pg_database_url).set(host="127.0.0.1", port=proxy.port)
        settings = {**FAULT_SETTINGS, **overrides}
        app = create_app(base_settings(DATABASE_URL=proxied.render_as_string(hide_password=False), **settings))
        apps.append(app)
        fault = Fault(app, proxy, pg_database_url)
        with app.app_context():
            database.breaker().add_listener(lambda old, new: fault.transitions.append((old.value, new.value)))
        return fault

    yield make
    for app in apps:
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def fault(make_fault) -> Fault:
    return make_fault()


@pytest.fixture
def request_durations() -> Iterator[list[float]]:
    """The app time (`duration_ms` of each request log line) of every request."""
    durations: list[float] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "request":
                durations.append(record.duration_ms)

    handler = Collect()
    logger = logging.getLogger("authapp.request")
    logger.addHandler(handler)
    yield durations
    logger.removeHandler(handler)


def users_in_database(url: str) -> dict[str, User]:
    """Every user, read straight from PostgreSQL (not through the proxy or the app)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(User.__table__)).all()
    finally:
        engine.dispose()
    return {row.username: row for row in rows}


def register_body(username: str) -> dict[str, str]:
    return {"email": f"{username}@example.com", "username": username, "password": PASSWORD}


# -- Traffic from client threads --------------------------------------------------------


@dataclass
class Answer:
    key: str
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def kind(self) -> tuple[int, str | None]:
        code = self.body.get("error_code") if isinstance(self.body, dict) else None
        return self.status, code


def check_envelope(answer: Answer) -> None:
    """The contract's error envelope, with Retry-After on a 503."""
    body = answer.body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert TIMESTAMP_RE.match(body["timestamp"]) and UUID_RE.match(body["request_id"]), body
    assert body["request_id"] == answer.headers["X-Request-ID"]
    if answer.status == 503:
        assert int(answer.headers["Retry-After"]) >= 1, answer.headers


class Traffic:
    """`threads` client threads, each sending requests in a loop (at most `limit`) until
    the block ends, recording every answer."""

    def __init__(self, threads: int, send: Callable[[int, int], Answer], limit: int = 5000) -> None:
        self.results: list[Answer] = []
        self.errors: list[BaseException] = []
        self._send = send
        self._limit = limit
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        for n in range(self._limit):
            if self._stop.is_set():
                return
            try:
                self.results.append(self._send(i, n))
            except BaseException as exc:  # an unanswered request: reported by the test
                self.errors.append(exc)
                return

    def count(self, kind: tuple[int, str | None], since: int = 0) -> int:
        return sum(answer.kind == kind for answer in self.results[since:])

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck"


# -- The database goes away and comes back ----------------------------------------------


@pytest.mark.faults
def test_database_outage_mid_traffic_then_recovery_without_restart(fault):
    with live_server(fault.app) as base:
        status, _, tokens = http("POST", f"{base}/auth/register", register_body("alice"))
        assert status == 201

        def me(i: int, n: int) -> Answer:
            return Answer(f"{i}.{n}", *http("GET", f"{base}/auth/me", headers=bearer(tokens["access_token"])))

        with Traffic(4, me) as traffic:
            wait_until(lambda: traffic.count((200, None)) >= 20, 10, "traffic to flow")
            fault.proxy.cut()
            wait_until(lambda: fault.count("closed", "open") == 1, 10, "the breaker to open")

            status, _, health = http("GET", f"{base}/health")
            assert status == 503 and health["status"] == "unhealthy", health
            assert health["checks"]["database"] == "error"
            assert health["checks"]["circuit_breaker"] in ("open", "half_open")
            status, _, live = http("GET", f"{base}/health/live")
            assert status == 200 and live["status"] == "alive"
            wait_until(lambda: traffic.count(BREAKER_OPEN) >= 5, 10, "the breaker to refuse calls")

            fault.proxy.pass_traffic()
            wait_until(lambda: fault.count("half_open", "closed") == 1, 10, "the breaker to close")
            recovered = len(traffic.results)
            wait_until(lambda: traffic.count((200, None), since=recovered) >= 20, 10, "traffic to succeed")

        status, _, health = http("GET", f"{base}/health")
        assert status == 200 and health["checks"] == {"database": "ok", "circuit_breaker": "closed"}

    assert traffic.errors == [], "every request got an answer"
    kinds = Counter(answer.kind for answer in traffic.results)
    assert set(kinds) == {(200, None), UNAVAILABLE, BREAKER_OPEN}, kinds
    for answer in traffic.results:
        if answer.status != 200:
            check_envelope(answer)
    assert fault.transitions[0] == ("closed", "open")
    assert fault.transitions[-2:] == [("open", "half_open"), ("half_open", "closed")]
    assert fault.state() == "closed"


@pytest.mark.faults
def test_open_breaker_answers_without_touching_the_database(make_fault, request_durations):
    fault = make_fault(CIRCUIT_BREAKER_TIMEOUT=30)
    client = fault.app.test_client()
    login = {"username": "alice", "password": PASSWORD}
    fault.proxy.cut()
    for _ in range(3):
        assert_error(client.post("/auth/login", json=login), *UNAVAILABLE)
    assert fault.state() == "open"

    touched: list[str] = []
    with fault.app.app_context():
        # The background probe (authapp.probe) checks the database on its own thread.
        def touch(what: str) -> Callable[..., None]:
            return lambda *args: touched.append(what) if threading.current_thread().name != PROBE_THREAD else None

        event.listen(db.engine, "do_connect", touch("connect"))
        event.listen(db.engine, "checkout", touch("checkout"))
    request_durations.clear()
    for _ in range(50):
        response = client.post("/auth/login", json=login)
        assert_error(response, *BREAKER_OPEN)
        assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert touched == [], "an open breaker never reaches for the database"
    assert len(request_durations) == 50
    # The whole request, JSON parsing and validation included, from the request log.
    assert statistics.median(request_durations) < 1.0, sorted(request_durations)
    print(f"\napp time of a refused request: median {statistics.median(request_durations):.3f} ms")


@pytest.mark.faults
def test_connection_lost_mid_transaction_is_503_and_rolled_back(fault):
    with fault.app.app_context():
        with pytest.raises(ServiceUnavailable) as lost:
            with database.unit_of_work() as session:
                session.add(User(email="half@example.com", username="half", hashed_password="x"))
                session.flush()  # the INSERT is on the server, not committed
                fault.proxy.cut()
        assert lost.value.headers["Retry-After"] == database.RETRY_AFTER_SECONDS
        assert database.breaker().stats()["consecutive_failures"] == 1
    assert "half" not in users_in_database(fault.direct_url)

    fault.proxy.pass_traffic()
    with fault.app.app_context(), database.unit_of_work() as session:
        assert session.scalar(text("SELECT 1")) == 1  # the same app, no restart
    assert fault.state() == "closed"


@pytest.mark.faults
def test_a_commit_whose_answer_is_lost_is_503_and_a_retry_says_409(fault):
    inserted = threading.Event()
    with fault.app.app_context():
        engine = db.engine

    @event.listens_for(engine, "before_cursor_execute")
    def watch(conn, cursor, statement, *args):
        if "INSERT INTO users" in statement:  # maybe after the transaction's SET LOCAL
            inserted.set()

    @event.listens_for(engine, "commit")
    def lose_commit_answer(conn):
        if inserted.is_set():
            fault.proxy.lose_next_answer()

    client = fault.app.test_client()
    assert_error(client.post("/auth/register", json=register_body("bob")), *UNAVAILABLE)
    assert len(fault.proxy.lost_answers) == 1 and b"COMMIT" in fault.proxy.lost_answers[0]
    stored = users_in_database(fault.direct_url)["bob"]
    assert verify_password(PASSWORD, stored.hashed_password), "the user is whole"

    event.remove(engine, "commit", lose_commit_answer)
    assert_error(client.post("/auth/register", json=register_body("bob")), 409, "USER_ALREADY_EXISTS")
    response = client.post("/auth/login", json={"username": "bob", "password": PASSWORD})
    assert response.status_code == 200 and response.get_json()["user"]["id"] == stored.id


# -- The database hangs -----------------------------------------------------------------


@pytest.mark.faults
def test_hung_database_fails_requests_within_the_timeout(fault):
    with live_server(fault.app) as base:
        status, _, tokens = http("POST", f"{base}/auth/register", register_body("carol"))
        assert status == 201  # the pool now holds a connection
        fault.proxy.hang()

        started = time.monotonic()
        status, headers, body = http("GET", f"{base}/auth/me", headers=bearer(tokens["access_token"]))
        elapsed = time.monotonic() - started
        check_envelope(Answer("me", status, headers, body))
        assert (status, body["error_code"]) == UNAVAILABLE
        # It waited for the deadline (the connection did hang), and not much longer.
        assert HUNG_POOLED_SECONDS - 0.2 <= elapsed < HUNG_POOLED_SECONDS + SLACK, elapsed

        started = time.monotonic()
        status, _, health = http("GET", f"{base}/health")
        elapsed = time.monotonic() - started
        assert status == 503 and health["status"] == "unhealthy"
        assert 0.8 <= elapsed < 1.0 + SLACK, elapsed  # a new connection into the hang: connect timeout

        fault.proxy.pass_traffic()
        status, _, me = http("GET", f"{base}/auth/me", headers=bearer(tokens["access_token"]))
        assert status == 200 and me["username"] == "carol"


@pytest.mark.faults
def test_slow_statement_is_cancelled_by_the_server_timeout(fault):
    with fault.app.app_context():
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable), database.unit_of_work() as session:
            session.execute(text("SELECT pg_sleep(30)"))
        assert 0.9 <= time.monotonic() - started < 1.0 + SLACK
        with database.unit_of_work() as session:
            assert session.scalar(text("SELECT 1")) == 1


# -- Nothing lost -------------------------------------------------------------------------


@pytest.mark.faults
def test_nothing_lost_when_the_database_is_cut_and_restored_under_registrations(fault):
    with live_server(fault.app) as base:

        def register(i: int, n: int) -> Answer:
            username = f"user{i}n{n}"
            return Answer(username, *http("POST", f"{base}/auth/register", register_body(username)))

        def registered_since(since: int) -> Callable[[], bool]:
            return lambda: traffic.count((201, None), since) >= 30

        def transitions(old: str, new: str, count: int) -> Callable[[], bool]:
            return lambda: fault.count(old, new) == count

        with Traffic(8, register) as traffic:
            for cycle in (1, 2):
                wait_until(registered_since(len(traffic.results)), 20, "registrations to succeed")
                fault.proxy.cut()
                wait_until(transitions("closed", "open", cycle), 10, "the breaker to open")
                fault.proxy.pass_traffic()
                wait_until(transitions("half_open", "closed", cycle), 10, "the breaker to close")
            wait_until(registered_since(len(traffic.results)), 20, "registrations after recovery")

    assert traffic.errors == [], "every request got an answer"
    answers = {answer.key: answer for answer in traffic.results}
    assert len(answers) == len(traffic.results)
    kinds = Counter(answer.kind for answer in answers.values())
    assert set(kinds) == {(201, None), UNAVAILABLE, BREAKER_OPEN}, kinds
    for answer in answers.values():
        if answer.status != 201:
            check_envelope(answer)

    stored = users_in_database(fault.direct_url)
    created = {key for key, answer in answers.items() if answer.status == 201}
    refused = {key for key, answer in answers.items() if answer.kind == BREAKER_OPEN}
    unknown = {key for key, answer in answers.items() if answer.kind == UNAVAILABLE}
    assert created <= stored.keys(), "a 201 whose user is missing"
    assert not refused & stored.keys(), "a refused request wrote a user"
    assert stored.keys() <= created | unknown, "a user that no request created"
    for username, row in stored.items():
        assert row.email == f"{username}@example.com" and row.is_active and row.created_at is not None
        assert row.hashed_password.startswith("$2b$04$") and verify_password(PASSWORD, row.hashed_password)
        if username in created:
            assert answers[username].body["user"]["id"] == row.id
    print(
        f"\n{len(answers)} registrations: {len(created)} x 201, {len(unknown)} x SERVICE_UNAVAILABLE "
        f"({len(stored.keys() & unknown)} of them committed before the connection broke), "
        f"{len(refused)} x CIRCUIT_BREAKER_OPEN; transitions {fault.transitions}"
    )


# -- Forks --------------------------------------------------------------------------------


# Python 3.12+ warns on fork() in a process with threads; the child here runs no thread.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_no_connection_crosses_a_fork(pg_database_url):
    app = create_app(base_settings(DATABASE_URL=pg_database_url))
    backend_pid = text("SELECT pg_backend_pid()")
    with app.app_context():
        parent = db.session.scalar(backend_pid)
        db.session.commit()  # the connection goes back to the pool, to be inherited
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports through the pipe and never returns
        try:
            gc.collect()  # the inherited pool, now unreferenced, must not close the parent's socket
            with app.app_context():
                os.write(writer, str(db.session.scalar(backend_pid)).encode())
                db.session.commit()
        except BaseException as exc:
            os.write(writer, f"error: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        answer = pipe.read()
    assert os.waitpid(child, 0)[1] == 0
    assert answer.isdigit(), answer
    assert int(answer) != parent, "the child used the parent's connection"
    with app.app_context():
        assert db.session.scalar(backend_pid) == parent, "the parent's connection survived the child"
        db.session.commit()

        database.dispose_after_fork()  # what a uWSGI postfork hook calls
        assert db.session.scalar(backend_pid) != parent
        db.session.commit()
        db.engine.dispose()


# -- Engine settings ----------------------------------------------------------------------


def test_postgresql_engine_settings(pg_database_url):
    app = create_app(
        base_settings(
            DATABASE_URL=pg_database_url,
            DATABASE_MAX_POOL_SIZE=7,
            DATABASE_CONNECT_TIMEOUT=3,
            DATABASE_STATEMENT_TIMEOUT_MS=2500,
        )
    )
    with app.app_context():
        pool = db.engine.pool
        # Outside uWSGI the thread count is unknown: 5 kept open, up to 7 in all.
        assert (pool.size(), pool._max_overflow, pool._timeout) == (5, 2, 3)
        assert pool._pre_ping is False and pool._recycle == 1800  # idle connections: see below
        assert db.session.scalar(text("SHOW statement_timeout")) == "2500ms"
        assert db.session.scalar(text("SHOW idle_session_timeout")) == "1min"
        dsn = db.session.connection().connection.driver_connection.dsn
        assert "options=" not in dsn, "PgBouncer refuses a startup options parameter"
        assert db.session.scalar(text("SELECT current_setting('application_name')")) == "authapp"
        connection = db.session.connection().connection.driver_connection
        assert (connection.connect_timeout, connection.io_timeout) == (3, 5.5)
        assert "connect_timeout=3" in connection.dsn
        db.session.commit()
        db.engine.dispose()


# -- Pooled connections: tested only after sitting idle; a session check in one round trip --


def _registered(app: Flask, username: str) -> tuple[Any, dict[str, str]]:
    client = app.test_client()
    response = client.post("/auth/register", json=register_body(username))
    assert response.status_code == 201, response.get_json()
    return client, bearer(response.get_json()["access_token"])


def _kill_pooled_connections(app: Flask, database_url: str) -> int:
    """Terminate, from outside, every server process behind the app's idle pool."""
    with app.app_context():
        assert db.engine.pool.checkedin() >= 1
    admin = create_engine(database_url, poolclass=NullPool)
    try:
        with admin.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'authapp' "
                    "AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        admin.dispose()
    assert killed >= 1
    return killed


def test_a_connection_that_died_while_idle_is_replaced_before_use(pg_database_url, monkeypatch):
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)  # every pooled connection counts as idle
    app = create_app(base_settings(DATABASE_URL=pg_database_url))
    client, auth = _registered(app, "idle")
    _kill_pooled_connections(app, pg_database_url)
    response = client.get("/auth/me", headers=auth)
    assert response.status_code == 200, response.get_json()
    with app.app_context():
        assert database.breaker().stats()["consecutive_failures"] == 0
        db.engine.dispose()


def test_a_connection_that_died_while_in_steady_use_fails_one_request(pg_database_url, monkeypatch):
    """The price of not pinging busy connections: when the server drops them, the first
    request on one is answered 503 (in the envelope); SQLAlchemy then drops the whole
    pool and the next request gets a new connection."""
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)
    app = create_app(base_settings(DATABASE_URL=pg_database_url))
    client, auth = _registered(app, "busy")
    _kill_pooled_connections(app, pg_database_url)
    assert_error(client.get("/auth/me", headers=auth), 503, "SERVICE_UNAVAILABLE")
    response = client.get("/auth/me", headers=auth)
    assert response.status_code == 200, response.get_json()
    with app.app_context():
        db.engine.dispose()


def test_a_lost_connection_leaves_no_connection_outside_the_pool(pg_database_url, monkeypatch):
    """When the session check loses its connection, the others of the pool opened before
    it are dropped at their next checkout, as SQLAlchemy does, and the ones other
    requests hold at that moment go back to the same pool: the server's connection count
    stays what the pool accounts for, round after round (renewing the whole pool would
    leave those outside it, still open)."""
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)
    app = create_app(base_settings(DATABASE_URL=pg_database_url))
    client, auth = _registered(app, "orphans")
    admin = create_engine(pg_database_url, poolclass=NullPool)
    count = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'authapp' AND pid <> pg_backend_pid()"
    )
    try:
        opened = []
        for _ in range(3):
            with app.app_context():
                engine = db.engine
                warm = [engine.raw_connection() for _ in range(4)]
                pids = {pooled.driver_connection.get_backend_pid() for pooled in warm}
                for pooled in warm:
                    pooled.close()
                held = [engine.raw_connection() for _ in range(2)]  # another request's, meanwhile
                idle = pids - {pooled.driver_connection.get_backend_pid() for pooled in held}
            with admin.connect() as connection:  # the idle ones die, as in a restart
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM unnest(:pids) pid"), {"pids": list(idle)}
                )
            time.sleep(0.1)
            assert_error(client.get("/auth/me", headers=auth), 503, "SERVICE_UNAVAILABLE")
            for pooled in held:
                pooled.close()
            with admin.connect() as connection:
                opened.append(connection.execute(count).scalar_one())
        assert opened == [2, 2, 2]  # the held ones: the pool renews them at their next checkout
        assert client.get("/auth/me", headers=auth).status_code == 200
    finally:
        admin.dispose()
        with app.app_context():
            db.engine.dispose()


def test_the_session_check_is_one_round_trip(pg_database_url, monkeypatch):
    """No pre-ping, no BEGIN, no COMMIT: one protected request, one wait on PostgreSQL."""
    import psycopg2.extensions

    app = create_app(base_settings(DATABASE_URL=pg_database_url))
    client, auth = _registered(app, "trips")
    assert client.get("/auth/me", headers=auth).status_code == 200  # a warm pool
    waits: list[str] = []
    real_wait = psycopg2.extensions.get_wait_callback()
    assert real_wait is database._wait_with_deadline

    def counting_wait(conn: Any, *args: Any) -> None:
        waits.append(conn.dsn)
        real_wait(conn, *args)

    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)  # this test may be slow: no ping
    psycopg2.extensions.set_wait_callback(counting_wait)
    try:
        response = client.get("/auth/me", headers=auth)
    finally:
        psycopg2.extensions.set_wait_callback(real_wait)
    assert response.status_code == 200 and response.get_json()["username"] == "trips"
    assert len(waits) == 1, waits
    with app.app_context():
        db.engine.dispose()


def test_an_autocommit_read_on_a_connection_that_died_leaves_the_pool_whole(pg_database_url):
    app = create_app(base_settings(DATABASE_URL=pg_database_url, DATABASE_MAX_POOL_SIZE=1))
    with app.test_request_context("/"):
        with database.autocommit_read() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
            connection.connection.driver_connection.close()  # it dies before going back
        assert db.engine.pool.checkedout() == 0
        with database.autocommit_read() as connection:  # the pool's one slot is free
            assert connection.connection.driver_connection.autocommit is True
            assert connection.execute(text("SELECT 2")).scalar_one() == 2
        with database.unit_of_work() as session:  # and transactions are transactions again
            assert session.connection().connection.driver_connection.autocommit is False
        db.engine.dispose()


def test_statement_timeout_zero_turns_both_deadlines_off(pg_database_url):
    app = create_app(base_settings(DATABASE_URL=pg_database_url, DATABASE_STATEMENT_TIMEOUT_MS=0))
    with app.app_context():
        assert db.session.scalar(text("SHOW statement_timeout")) == "0"
        assert db.session.connection().connection.driver_connection.io_timeout is None
        db.session.commit()
        db.engine.dispose()


def test_sqlite_keeps_its_defaults(tmp_path):
    app = create_app(base_settings(DATABASE_URL=f"sqlite:///{tmp_path}/plain.db"))
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"] == {"hide_parameters": True}
    with app.app_context():
        assert db.engine.pool._pre_ping is False
        db.engine.dispose()


@pytest.mark.parametrize(
    "name,value",
    [
        ("DATABASE_CONNECT_TIMEOUT", "0"),
        ("DATABASE_CONNECT_TIMEOUT", "soon"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "-1"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "1.5"),
        ("DATABASE_MAX_POOL_SIZE", "0"),
    ],
)
def test_bad_database_settings_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_database_defaults():
    settings = load_settings({})
    assert (settings["DATABASE_CONNECT_TIMEOUT"], settings["DATABASE_STATEMENT_TIMEOUT_MS"]) == (5, 5000)
