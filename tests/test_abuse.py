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
            "LOGIN_RATE_LIMIT": "3/minute",
            "LOGIN_MAX_FAILURES": "2",
        }
    ],
)
# Flask-Limiter keeps "storage is down" in its (process-wide) extension object, so this
# runs once, on SQLite: what it shows is about the limiter's storage, not the database.
@pytest.mark.parametrize("backend", ["sqlite"])
def test_storage_down_fails_open_with_a_logged_error_and_local_limits(log_text, client, tokens):
    answers = [login(client, WRONG).status_code for _ in range(3)]
    # no 500; the lockout cannot count (fails open), the per-address limit falls back to memory
    assert answers == [401, 401, 401]
    assert_error(login(client), 429, "RATE_LIMITED")
    text = log_text()
    assert "lockout storage unavailable" in text
    assert "falling back to in-memory storage" in text


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
