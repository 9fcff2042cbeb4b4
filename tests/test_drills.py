"""Outage drills on a PostgreSQL cluster of the test's own (tests/pgcluster.py), under
paced load from client threads against a live server: a fast restart, a 10 s stop, a
read-only database. Each asserts how soon service is back, that clients are told to come
back (503 with Retry-After) while it is not, and that no acknowledged registration is
lost. Marked `faults`; about 40 s in all.
"""

from __future__ import annotations

import itertools
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import flask_migrate
import pgcluster
import pytest
from flask import Flask
from helpers import base_settings, bearer, http, live_server, wait_until
from test_faults import BREAKER_OPEN, UNAVAILABLE, Answer, check_envelope, register_body, users_in_database

from authapp import create_app, database
from authapp.extensions import db

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not pgcluster.available(), reason="needs PostgreSQL's initdb (postgresql-15)"),
]

# The production defaults where they matter: a breaker that stays open 60 s on its own.
DRILL_SETTINGS = {
    "CIRCUIT_BREAKER_THRESHOLD": 3,
    "CIRCUIT_BREAKER_TIMEOUT": 60,
    "DATABASE_CONNECT_TIMEOUT": 2,
}
# Serving again this long after PostgreSQL accepts connections: the probe's longest
# interval (1 s) plus a connection and the slack of a loaded 2-core machine.
RECOVERY_BOUND = 2.0
_names = itertools.count()


@pytest.fixture(scope="module")
def cluster() -> Iterator[pgcluster.PgCluster]:
    with pgcluster.pg_cluster() as cluster:
        yield cluster


@pytest.fixture
def make_app(cluster) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        url = cluster.create_database(f"drill_{os.getpid()}_{next(_names)}")
        app = create_app(base_settings(DATABASE_URL=url, **{**DRILL_SETTINGS, **overrides}))
        with app.app_context():
            flask_migrate.upgrade()
        app.transitions = []  # type: ignore[attr-defined]
        with app.app_context():
            database.breaker().add_listener(lambda old, new: app.transitions.append((old.value, new.value)))
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            database.probe().stop()
            db.engine.dispose()


@dataclass
class Timed:
    started: float
    ended: float
    answer: Answer


@dataclass
class PacedLoad:
    """`threads` clients, each registering a new user every `pause` seconds."""

    base: str
    threads: int = 4
    pause: float = 0.02
    results: list[Timed] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]

    def _run(self, i: int) -> None:
        for n in itertools.count():
            if self._stop.wait(self.pause):
                return
            username = f"u{i}n{n}"
            started = time.monotonic()
            try:
                answer = Answer(
                    username, *http("POST", f"{self.base}/auth/register", register_body(username), timeout=15)
                )
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.results.append(Timed(started, time.monotonic(), answer))

    def __enter__(self) -> PacedLoad:
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)
        assert not any(w.is_alive() for w in self._workers), "a client thread is stuck"

    def first_success_after(self, moment: float) -> float | None:
        times = [t.started for t in self.results if t.started >= moment and t.answer.status == 201]
        return min(times) if times else None

    def served_since(self, moment: float) -> Callable[[], bool]:
        return lambda: self.first_success_after(moment) is not None


def check_nothing_lost(load: PacedLoad, url: str) -> dict[str, int]:
    """Every request answered in the contract; every 201's user stored, whole."""
    assert load.errors == [], "every request got an answer"
    kinds: dict[str, int] = {}
    stored = users_in_database(url)
    for timed in load.results:
        answer = timed.answer
        kinds[str(answer.kind)] = kinds.get(str(answer.kind), 0) + 1
        if answer.status == 201:
            row = stored.get(answer.key)
            assert row is not None, f"acknowledged registration {answer.key} lost"
            assert row.id == answer.body["user"]["id"]
        else:
            assert answer.kind in (UNAVAILABLE, BREAKER_OPEN), answer
            check_envelope(answer)
            if answer.kind == BREAKER_OPEN:
                assert answer.key not in stored, "a refused request wrote a user"
    return kinds


def test_a_fast_restart_costs_about_a_second_not_the_breaker_timeout(cluster, make_app):
    app = make_app()
    with live_server(app) as base, PacedLoad(base) as load:
        wait_until(lambda: len(load.results) >= 20, 20, "traffic to flow")
        restart_started = time.monotonic()
        cluster.restart("fast")
        back = time.monotonic()  # pg_ctl -w: PostgreSQL accepts connections again
        wait_until(load.served_since(back), 10, "registrations to succeed after the restart")
        recovered = load.first_success_after(back) - back
        time.sleep(RECOVERY_BOUND + 1)
        ended = time.monotonic()

    kinds = check_nothing_lost(load, app.config["SQLALCHEMY_DATABASE_URI"])
    late = [t.answer.kind for t in load.results if back + RECOVERY_BOUND <= t.started < ended - 0.2]
    assert late and all(kind == (201, None) for kind in late), f"still failing after {RECOVERY_BOUND}s: {late}"
    assert ("closed", "open") in app.transitions, "the restart opened the breaker (the drill needs it)"
    assert recovered < RECOVERY_BOUND, recovered
    print(
        f"\nrestart took {back - restart_started:.2f}s; first registration served {recovered:.2f}s after "
        f"PostgreSQL was back; answers {kinds}; transitions {app.transitions}"
    )


def test_a_10s_stop_fails_fast_during_and_recovers_within_2s_after(cluster, make_app):
    app = make_app()
    with live_server(app) as base, PacedLoad(base) as load:
        wait_until(lambda: len(load.results) >= 20, 20, "traffic to flow")
        cluster.stop("fast")
        down = time.monotonic()
        time.sleep(10)
        status, headers, health = http("GET", f"{base}/health")
        assert status == 503 and health["checks"]["database"] == "error", health
        cluster.start()
        back = time.monotonic()
        wait_until(load.served_since(back), 10, "registrations to succeed after the start")
        recovered = load.first_success_after(back) - back
        time.sleep(RECOVERY_BOUND + 1)
        ended = time.monotonic()
        status, _, health = http("GET", f"{base}/health")
        assert status == 200 and health["checks"] == {"database": "ok", "circuit_breaker": "closed"}, health

    kinds = check_nothing_lost(load, app.config["SQLALCHEMY_DATABASE_URI"])
    during = [t for t in load.results if down + 0.5 <= t.started and t.ended <= back]
    assert len(during) >= 50, len(during)
    assert all(t.answer.status == 503 for t in during)
    durations = sorted(t.ended - t.started for t in during)
    assert statistics.median(durations) < 0.1, durations[len(durations) // 2]  # fast: refused, not waited on
    retry_after = [int(t.answer.headers["Retry-After"]) for t in during if t.answer.kind == BREAKER_OPEN]
    assert retry_after and max(retry_after) <= 2, "come back when the probe checks, not in 60 s"
    late = [t.answer.kind for t in load.results if back + RECOVERY_BOUND <= t.started < ended - 0.2]
    assert late and all(kind == (201, None) for kind in late), f"still failing after {RECOVERY_BOUND}s: {late}"
    assert recovered < RECOVERY_BOUND, recovered
    with app.app_context():
        probe = database.probe()
        assert probe.checks <= 10 / 1.0 + 8, "backoff: a dead database is not hammered"
    print(
        f"\n10 s stop: {len(during)} requests during, median {statistics.median(durations) * 1000:.1f} ms; first "
        f"registration served {recovered:.2f}s after PostgreSQL was back; {probe.checks} probe checks; {kinds}"
    )


def test_a_read_only_database_is_503_with_retry_after_opens_the_breaker_and_readiness_says_so(cluster, make_app):
    app = make_app(CIRCUIT_BREAKER_PROBE_INTERVAL_MS=200)
    name = app.config["SQLALCHEMY_DATABASE_URI"].rsplit("/", 1)[1]
    client = app.test_client()
    response = client.post("/auth/register", json=register_body("before"))
    assert response.status_code == 201
    token = response.get_json()["access_token"]

    with cluster.admin() as conn, conn.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    with app.app_context():
        db.engine.dispose()  # the setting applies to new sessions

    health = client.get("/health")
    assert health.status_code == 503
    assert health.get_json()["checks"] == {"database": "read_only", "circuit_breaker": "closed"}
    assert client.get("/auth/me", headers=bearer(token)).status_code == 200, "reads still work"
    answer = client.post("/auth/register", json=register_body("ro0"))
    body = answer.get_json()
    assert (answer.status_code, body["error_code"]) == UNAVAILABLE, body
    assert "read-only" in body["detail"] and int(answer.headers["Retry-After"]) >= 1
    # The read before the write succeeded; the refused write opens the breaker anyway.
    assert app.transitions == [("closed", "open")], "a refused write counts like a lost connection"
    refused = client.post("/auth/register", json=register_body("ro-open"))
    assert (refused.status_code, refused.get_json()["error_code"]) == BREAKER_OPEN
    assert int(refused.headers["Retry-After"]) <= 2
    time.sleep(1)
    with app.app_context():
        assert database.breaker().state.value == "open", "the probe does not close it while writes are refused"
        assert "read-only" in database.probe().last_error
    health = client.get("/health")
    assert health.status_code == 503
    assert health.get_json()["checks"] == {"database": "read_only", "circuit_breaker": "open"}, "the probe's view"

    with cluster.admin() as conn, conn.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    writable = time.monotonic()
    wait_until(
        lambda: client.post("/auth/register", json=register_body(f"rw{time.monotonic_ns()}")).status_code == 201,
        10,
        "writes",
    )
    assert time.monotonic() - writable < RECOVERY_BOUND
    assert client.get("/auth/me", headers=bearer(token)).status_code == 200
    assert client.get("/health").get_json()["checks"] == {"database": "ok", "circuit_breaker": "closed"}
    stored = users_in_database(app.config["SQLALCHEMY_DATABASE_URI"])
    assert "before" in stored and not {"ro0", "ro-open"} & stored.keys()


# -- Too many connections -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[pgcluster.PgCluster]:
    """Room for 4 connections in all (the app connects as a superuser: no reserved slots)."""
    with pgcluster.pg_cluster(max_connections=4, superuser_reserved_connections=0) as cluster:
        yield cluster


def hold_connections(app: Flask, count: int) -> None:
    """Use `count` connections at once, as `count` busy threads would, then give them back."""
    with app.app_context():
        held = [db.engine.connect() for _ in range(count)]
        for connection in held:
            connection.close()
        assert db.engine.pool.checkedin() == count, "an idle pool keeps them"


def test_idle_pools_give_their_server_slots_back_after_the_idle_timeout(small_cluster):
    url = small_cluster.create_database(f"slots_{os.getpid()}")
    settings = base_settings(DATABASE_URL=url, DATABASE_IDLE_TIMEOUT=2, **DRILL_SETTINGS)
    migrator = create_app(settings)
    with migrator.app_context():
        flask_migrate.upgrade()
        db.engine.dispose()
    apps = [create_app(settings) for _ in range(3)]
    try:
        first, second, third = apps
        registered = first.test_client().post("/auth/register", json=register_body("early"))
        me = bearer(registered.get_json()["access_token"])
        hold_connections(first, 2)
        hold_connections(second, 2)  # the server is full: 4 of 4, all idle in two pools
        client = third.test_client()
        full = time.monotonic()
        response = client.get("/auth/me", headers=me)
        assert (response.status_code, response.get_json()["error_code"]) == UNAVAILABLE
        assert response.headers["Retry-After"]

        wait_until(lambda: client.get("/auth/me", headers=me).status_code == 200, 10, "a slot for /auth/me")
        assert client.post("/auth/register", json=register_body("late")).status_code == 201
        recovered = time.monotonic() - full
        assert recovered < 2 + RECOVERY_BOUND + 1, recovered
        for app in (first, second):  # their dead pooled connections are replaced, not served
            assert app.test_client().get("/health").status_code == 200
        print(f"\nserver full of idle connections: serving again after {recovered:.1f}s (idle timeout 2 s)")
    finally:
        for app in apps:
            with app.app_context():
                database.probe().stop()
                db.engine.dispose()
