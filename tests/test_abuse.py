"""Abuse protection: per-address limits, per-account lockout, shared counters, headers."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import PASSWORD, TEST_REDIS_URL, assert_error, base_settings, bearer, post_json

from authapp.observability.logs import make_handler

ROOT = Path(__file__).resolve().parent.parent

WRONG = "definitely-wrong-password-1"


def login(client, password=PASSWORD, *, address="127.0.0.1", headers=None, **who):
    who = who or {"username": "alice"}
    return client.post(
        "/auth/login", json={**who, "password": password}, environ_base={"REMOTE_ADDR": address}, headers=headers
    )


# -- Per-address limits -------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [{"RATELIMIT_ENABLED": "true", "LOGIN_RATE_LIMIT": "3/minute", "LOGIN_MAX_FAILURES": "100"}]
)
def test_login_limit_per_address(client, tokens):
    for _ in range(3):
        assert login(client, WRONG).status_code == 401
    limited = login(client)
    assert_error(limited, 429, "RATE_LIMITED")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # a forged X-Forwarded-For does not make a new client
    for forged in ("10.9.8.7", "203.0.113.5, 10.0.0.1", "127.0.0.2"):
        assert_error(login(client, headers={"X-Forwarded-For": forged}), 429, "RATE_LIMITED")
    # another address has its own budget
    assert login(client, address="127.0.0.9").status_code == 200


@pytest.mark.parametrize("settings", [{"RATELIMIT_ENABLED": "true", "REGISTER_RATE_LIMIT": "2/minute"}])
def test_register_limit_per_address(client):
    for i in range(2):
        body = {"email": f"u{i}@example.com", "username": f"user{i}", "password": PASSWORD}
        assert client.post("/auth/register", json=body).status_code == 201
    body = {"email": "u9@example.com", "username": "user9", "password": PASSWORD}
    limited = client.post("/auth/register", json=body)
    assert_error(limited, 429, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("settings", [{"RATELIMIT_ENABLED": "true", "REFRESH_RATE_LIMIT": "2/minute"}])
def test_refresh_limit_per_address(client, tokens):
    token = tokens["refresh_token"]
    for _ in range(2):
        token = client.post("/auth/refresh", json={"refresh_token": token}).get_json()["refresh_token"]
    assert_error(client.post("/auth/refresh", json={"refresh_token": token}), 429, "RATE_LIMITED")


@pytest.mark.parametrize("settings", [{"RATELIMIT_ENABLED": "false", "LOGIN_RATE_LIMIT": "1/minute"}])
def test_limits_can_be_turned_off(client, tokens):
    for _ in range(4):
        assert login(client).status_code == 200


# -- Per-account lockout ------------------------------------------------------------------

LOCKOUT = {"LOGIN_MAX_FAILURES": "3", "LOGIN_FAILURE_WINDOW": "2"}


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_lockout_engages_and_lifts(client, tokens):
    for _ in range(3):
        assert_error(login(client, WRONG), 401, "INVALID_CREDENTIALS")
    # locked: even the right password, by username or by email, from any address
    locked = login(client)
    assert_error(locked, 429, "RATE_LIMITED")
    assert 1 <= int(locked.headers["Retry-After"]) <= 2
    assert_error(login(client, email="ALICE@example.com", address="127.0.0.5"), 429, "RATE_LIMITED")
    time.sleep(2.2)
    assert login(client).status_code == 200


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_lockout_counts_email_and_username_together(client, tokens):
    login(client, WRONG)
    login(client, WRONG, email="alice@example.com")
    login(client, WRONG, username="ALICE")
    assert_error(login(client, email="alice@example.com"), 429, "RATE_LIMITED")


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_success_clears_the_count(client, tokens):
    for _ in range(2):
        login(client, WRONG)
    assert login(client).status_code == 200
    for _ in range(2):
        login(client, WRONG)
    assert login(client).status_code == 200


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_lockout_does_not_tell_accounts_apart(client, tokens):
    """A missing account answers exactly like an existing one, failure after failure."""
    existing = [login(client, WRONG) for _ in range(4)]
    missing = [login(client, WRONG, username="no-such-user") for _ in range(4)]
    for a, b in zip(existing, missing, strict=True):
        assert (a.status_code, a.get_json()["error_code"], a.get_json()["detail"]) == (
            b.status_code,
            b.get_json()["error_code"],
            b.get_json()["detail"],
        )
    assert [r.status_code for r in existing] == [401, 401, 401, 429]


# -- Storage down -------------------------------------------------------------------------


@pytest.fixture
def log_text():
    stream = io.StringIO()
    handlers = [make_handler(stream)]
    loggers = [logging.getLogger("authapp"), logging.getLogger("flask-limiter")]
    for logger in loggers:
        logger.addHandler(handlers[0])
    yield stream.getvalue
    for logger in loggers:
        logger.removeHandler(handlers[0])


@pytest.mark.parametrize(
    "settings",
    [
        {
            "RATELIMIT_ENABLED": "true",
            "RATELIMIT_STORAGE_URI": "redis://127.0.0.1:1/0",
            "LOGIN_RATE_LIMIT": "4/minute",
            "LOGIN_MAX_FAILURES": "2",
        }
    ],
)
# Flask-Limiter keeps "storage is down" in its (process-wide) extension object, so this
# runs once, on SQLite: what it shows is about the limiter's storage, not the database.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_redis_down_keeps_the_lockout_and_falls_back_to_local_limits(log_text, client, tokens):
    answers = [login(client, WRONG).status_code for _ in range(3)]
    # no 500; the lockout lives in the database and still counts
    assert answers == [401, 401, 429]
    # the per-address limit falls back to memory: the 5th request from this address is refused
    assert_error(login(client, WRONG, username="nobody"), 401, "INVALID_CREDENTIALS")
    assert_error(login(client, username="nobody"), 429, "RATE_LIMITED")
    assert "falling back to in-memory storage" in log_text()


# -- The lockout is shared by every process and instance, with no Redis -------------------


@pytest.mark.parametrize("settings", [{"RATELIMIT_ENABLED": "true", "LOGIN_RATE_LIMIT": "1000/minute"}])
def test_two_instances_share_the_lockout_without_redis(app, tokens, database_url):
    """Two apps (as two workers or two instances) on one database with memory:// storage:
    40 wrong passwords alternating between them get 10 checked answers, not 10 each."""
    from authapp import create_app

    other = create_app(base_settings(DATABASE_URL=database_url, RATELIMIT_ENABLED="true"))
    assert app.config["RATELIMIT_STORAGE_URI"] == other.config["RATELIMIT_STORAGE_URI"] == "memory://"
    clients = (app.test_client(), other.test_client())
    answers = [login(clients[i % 2], WRONG).status_code for i in range(40)]
    assert answers == [401] * 10 + [429] * 30
    for c in clients:
        assert_error(login(c), 429, "RATE_LIMITED")


def test_uwsgi_workers_with_memory_storage_log_what_it_costs(database_url, monkeypatch, log_text):
    import types

    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(numproc=4, opt={}))
    from authapp import create_app

    def warnings(environment: str, **settings: str) -> int:
        before = log_text().count("ratelimit_storage_per_process")
        create_app(
            base_settings(
                DATABASE_URL=database_url,
                ENVIRONMENT=environment,
                RATELIMIT_ENABLED="true",
                MAIL_URL="smtp://127.0.0.1:25",
                MAIL_FROM="authapp@example.com",
                FRONTEND_URL="https://app.example.com",
                **settings,
            )
        )
        return log_text().count("ratelimit_storage_per_process") - before

    assert warnings("production") == 1
    assert "memory:// with 4 worker processes" in log_text()
    assert "up to 4 times LOGIN_RATE_LIMIT" in log_text()
    assert warnings("development") == 0
    assert warnings("production", RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/0") == 0
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(numproc=1, opt={}))
    assert warnings("production") == 0


# -- Two processes, one Redis -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = (
    "import sys; from werkzeug.serving import run_simple; from wsgi import app; "
    "run_simple('127.0.0.1', int(sys.argv[1]), app, threaded=True)"
)


@pytest.fixture
def two_instances(database_url, tmp_path):
    """Two app processes on one database and one Redis, with a key prefix of their own."""
    if not TEST_REDIS_URL:
        pytest.skip("Redis skipped: TEST_REDIS_URL not set")
    import redis

    prefix = f"authapp-test-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "DATABASE_URL"))}
    env.update(
        base_settings(
            DATABASE_URL=database_url,
            RATELIMIT_ENABLED="true",
            RATELIMIT_STORAGE_URI=TEST_REDIS_URL,
            RATELIMIT_KEY_PREFIX=prefix,
            LOGIN_RATE_LIMIT="4/minute",
            LOGIN_MAX_FAILURES="100",
        ),
        PYTHONPATH=str(ROOT),
    )
    processes, urls, logs = [], [], []
    try:
        for _ in range(2):
            port = _free_port()
            logs.append((tmp_path / f"instance-{port}.log").open("w"))
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", SERVE, str(port)], cwd=ROOT, env=env, stdout=logs[-1], stderr=logs[-1]
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health/live", timeout=2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{url} did not start; see {tmp_path}"
                    time.sleep(0.2)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        for log in logs:
            log.close()
        client = redis.Redis.from_url(TEST_REDIS_URL)
        for key in client.scan_iter(f"*{prefix}*"):
            client.delete(key)


def test_instances_share_the_counters(two_instances, backend):
    a, b = two_instances
    status, _ = post_json(f"{a}/auth/register", {"email": "z@example.com", "username": "zed", "password": PASSWORD})
    assert status == 201
    answers = [post_json(f"{(a, b)[i % 2]}/auth/login", {"username": "zed", "password": WRONG})[0] for i in range(8)]
    # alternating instances does not double the budget of 4 per minute
    assert answers == [401] * 4 + [429] * 4


# -- Headers ------------------------------------------------------------------------------


def test_security_headers(client, tokens):
    for response in (
        client.get("/health/live"),
        client.get("/auth/me", headers=bearer(tokens["access_token"])),
        client.get("/nope"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_token_responses_are_not_cached(client, tokens):
    for response in (
        login(client),
        client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]}),
        client.get("/auth/me", headers=bearer(tokens["access_token"])),
        login(client, WRONG),
    ):
        assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_have_a_strict_policy_and_no_inline_script(client, page):
    response = client.get(page)
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "'unsafe-eval'" not in policy
    assert "script-src 'self' 'unsafe-inline'" not in policy
    html = response.get_data(as_text=True)
    import re

    for tag in re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S):
        attributes, body = tag
        assert "src=" in attributes or 'type="application/json"' in attributes, tag


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_parallel_guesses_cannot_outrun_the_lockout(app, tokens):
    """Twenty guesses at once against a real server: at most LOGIN_MAX_FAILURES are checked."""
    import threading

    from helpers import live_server

    answers: list[int] = []
    barrier = threading.Barrier(20)
    with live_server(app) as base:

        def guess() -> None:
            barrier.wait()
            answers.append(post_json(f"{base}/auth/login", {"username": "alice", "password": WRONG})[0])

        threads = [threading.Thread(target=guess) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert sorted(answers) == [401] * 3 + [429] * 17


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_change_password_guesses_count_against_the_account(client, tokens):
    headers = bearer(tokens["access_token"])
    body = {"current_password": WRONG, "new_password": "granite-meadow-lantern-7"}
    for _ in range(3):
        assert_error(client.post("/auth/change-password", headers=headers, json=body), 401, "INVALID_CREDENTIALS")
    locked = client.post("/auth/change-password", headers=headers, json={**body, "current_password": PASSWORD})
    assert_error(locked, 429, "RATE_LIMITED")
    assert_error(login(client), 429, "RATE_LIMITED")


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_an_attempt_counted_deletes_the_accounts_attempts_past_the_window(app, client, tokens):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select

    from authapp.extensions import db
    from authapp.models import LoginAttempt

    login(client, WRONG)
    login(client, WRONG)
    with app.app_context():
        old = datetime.now(UTC) - timedelta(seconds=3)
        db.session.execute(LoginAttempt.__table__.update().values(attempted_at=old))
        db.session.commit()
    login(client, WRONG)
    with app.app_context():
        left = db.session.scalars(select(LoginAttempt.attempted_at)).all()
    assert len(left) == 1 and left[0] > old.replace(tzinfo=left[0].tzinfo)
    # the two past the window no longer count: two more failures, and the account still opens
    login(client, WRONG)
    assert login(client).status_code == 200


@pytest.mark.parametrize("settings", [LOCKOUT])
def test_prune_deletes_attempts_past_the_window(app, client, tokens):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import func, select

    from authapp.extensions import db
    from authapp.models import LoginAttempt, LoginGuard

    login(client, WRONG)
    login(client, WRONG, username="nobody")
    with app.app_context():
        old = datetime.now(UTC) - timedelta(seconds=3)
        db.session.execute(LoginAttempt.__table__.update().where(LoginAttempt.key != "user:1").values(attempted_at=old))
        db.session.commit()
    result = app.test_cli_runner().invoke(args=["sessions", "prune"])
    assert result.exit_code == 0 and "1 login attempt(s)" in result.output, result.output
    with app.app_context():
        assert db.session.scalars(select(LoginAttempt.key)).all() == ["user:1"]
        assert db.session.scalar(select(func.count()).select_from(LoginGuard)) == 1
    # what is left still counts
    login(client, WRONG)
    login(client, WRONG)
    assert_error(login(client), 429, "RATE_LIMITED")


@pytest.mark.parametrize(
    "settings", [{"RATELIMIT_ENABLED": "true", "LOGIN_RATE_LIMIT": "3/minute", "LOGIN_MAX_FAILURES": "100"}]
)
def test_an_ipv6_client_is_counted_by_its_64(client, tokens):
    # 20 addresses of one /64 share one budget of 3
    answers = [login(client, WRONG, address=f"2001:db8:1:2::{i:x}").status_code for i in range(1, 21)]
    assert answers == [401] * 3 + [429] * 17
    assert_error(login(client, address="2001:db8:1:2:ffff:ffff:ffff:ffff"), 429, "RATE_LIMITED")
    # the next /64 is another client
    assert login(client, address="2001:db8:1:3::1").status_code == 200


@pytest.mark.parametrize(
    "settings", [{"RATELIMIT_ENABLED": "true", "LOGIN_RATE_LIMIT": "3/minute", "LOGIN_MAX_FAILURES": "100"}]
)
def test_an_ipv4_mapped_address_counts_as_the_ipv4_address(client, tokens):
    for address in ("192.0.2.7", "::ffff:192.0.2.7", "::ffff:c000:207"):
        assert login(client, WRONG, address=address).status_code == 401
    assert_error(login(client, address="192.0.2.7"), 429, "RATE_LIMITED")
    assert login(client, address="192.0.2.8").status_code == 200
