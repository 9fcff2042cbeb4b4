"""The counters' Redis hangs (SIGSTOP) or dies under the app: every Redis call is bounded
by RATELIMIT_STORAGE_TIMEOUT_MS, and a Redis that just failed is left alone for a while,
so a login costs at most about that bound and then nothing. A Redis of the test's own, on
a free port (never the shared one)."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from helpers import PASSWORD, base_settings, bearer, http, live_server, wait_until

from authapp import create_app
from authapp.extensions import db

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0, reason="needs redis-server"
)
TIMEOUT_MS = 100
# The most one request may pay for a hung Redis: a limiter call and a lockout call, each
# bounded, plus a loaded 2-core machine's slack.
BOUND = 2 * TIMEOUT_MS / 1000 + 0.4


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def redis_server() -> Iterator[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    process.port = port  # type: ignore[attr-defined]
    try:
        import redis

        client = redis.Redis(port=port, socket_timeout=1)
        wait_until(lambda: _pings(client), 10, "redis-server to start")
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait(timeout=10)


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


@pytest.fixture
def settings(redis_server) -> dict[str, str]:
    return {
        "RATELIMIT_ENABLED": "true",
        "RATELIMIT_STORAGE_URI": f"redis://127.0.0.1:{redis_server.port}/0",
        "RATELIMIT_KEY_PREFIX": f"test-{uuid.uuid4().hex}",
        "RATELIMIT_STORAGE_TIMEOUT_MS": str(TIMEOUT_MS),
        "LOGIN_RATE_LIMIT": "10000/minute",
        "REGISTER_RATE_LIMIT": "10000/minute",
        "LOGIN_MAX_FAILURES": "2",
    }


def timed(method: str, url: str, body=None, headers=None) -> tuple[float, int]:
    started = time.monotonic()
    status, _, _ = http(method, url, body, headers=headers, timeout=5)
    return time.monotonic() - started, status


def test_a_paused_redis_costs_a_request_at_most_the_timeout_and_a_dead_one_nothing(app, redis_server):
    login = {"username": "alice", "password": PASSWORD}
    with live_server(app) as base:
        status, _, tokens = http("POST", f"{base}/auth/register", {**login, "email": "alice@example.com"})
        assert status == 201
        me = bearer(tokens["access_token"])
        bob = {"username": "bob", "password": PASSWORD}
        assert http("POST", f"{base}/auth/register", {**bob, "email": "bob@example.com"})[0] == 201
        assert timed("POST", f"{base}/auth/login", login)[1] == 200  # Redis in use

        os.kill(redis_server.pid, signal.SIGSTOP)
        logins = [timed("POST", f"{base}/auth/login", login) for _ in range(10)]
        reads = [timed("GET", f"{base}/auth/me", headers=me) for _ in range(20)]
        assert {status for _, status in logins} == {200} and {status for _, status in reads} == {200}
        worst = max(d for d, _ in logins)
        assert worst < BOUND, f"a login waited {worst:.2f}s on a paused Redis"
        assert statistics.median(d for d, _ in logins) < 0.1, "after a failure Redis is left alone"
        assert max(d for d, _ in reads) < BOUND
        # The per-account lockout lives in the database: it still counts with Redis hung.
        wrong = [http("POST", f"{base}/auth/login", {**bob, "password": "wrong-password"})[0] for _ in range(3)]
        assert wrong == [401, 401, 429], wrong

        os.kill(redis_server.pid, signal.SIGCONT)
        redis_server.kill()
        redis_server.wait(timeout=10)
        dead = [timed("POST", f"{base}/auth/login", login) for _ in range(10)]
        assert {status for _, status in dead} == {200}
        assert max(d for d, _ in dead) < BOUND
    print(
        f"\npaused Redis: logins worst {worst * 1000:.0f} ms, median "
        f"{statistics.median(d for d, _ in logins) * 1000:.0f} ms; /auth/me worst "
        f"{max(d for d, _ in reads) * 1000:.0f} ms; dead Redis: logins worst {max(d for d, _ in dead) * 1000:.0f} ms"
    )


def test_the_counters_redis_gets_bounded_timeouts(redis_server):
    app = create_app(
        base_settings(
            RATELIMIT_ENABLED="true",
            RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{redis_server.port}/0",
            RATELIMIT_STORAGE_TIMEOUT_MS="250",
            DATABASE_URL="sqlite://",
        )
    )
    assert app.config["RATELIMIT_STORAGE_OPTIONS"] == {"socket_timeout": 0.25, "socket_connect_timeout": 0.25}
    with app.app_context():
        db.engine.dispose()
