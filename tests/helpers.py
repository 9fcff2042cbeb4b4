"""Helpers shared by the test modules."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jwt
from flask import Flask
from werkzeug.serving import make_server

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "").strip()
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "").strip()
SECRET = "test-secret-key-that-is-long-enough-for-hs512-0123456789abcdefgh"
PASSWORD = "violet-harbor-cactus-42"
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def base_settings(**overrides: Any) -> dict[str, Any]:
    """Settings for a test app; values are strings, as the environment gives them."""
    settings = {
        "ENVIRONMENT": "testing",
        "JWT_SECRET_KEY": SECRET,
        "BCRYPT_ROUNDS": "4",
        "RATELIMIT_ENABLED": "false",
        "LOG_LEVEL": "INFO",
    }
    settings.update({k: str(v) for k, v in overrides.items()})
    return settings


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sid_of(body: dict[str, Any]) -> str:
    """The session id of a TokenResponse."""
    return jwt.decode(body["access_token"], options={"verify_signature": False})["sid"]


def assert_error(response, status: int, code: str) -> dict[str, Any]:
    """Check the contract's error envelope and return its body."""
    body = response.get_json()
    assert response.status_code == status, (response.status_code, body)
    assert body["error_code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert TIMESTAMP_RE.match(body["timestamp"]), body["timestamp"]
    assert UUID_RE.match(body["request_id"]), body["request_id"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


@contextmanager
def live_server(app: Flask) -> Iterator[str]:
    """Serve `app` on a free loopback port with a thread per request; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], Any]:
    """One request to a live server: (status, headers, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, answer, raw = error.code, dict(error.headers), error.read()
    return status, answer, json.loads(raw) if raw else None


def post_json(url: str, body: dict[str, Any], timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """POST a JSON body to a live server: (status, parsed JSON body)."""
    status, _, answer = http("POST", url, body, timeout=timeout)
    return status, answer or {}


@contextmanager
def statements_sent(engine: Any) -> Iterator[list[str]]:
    """Every statement the engine's connections send to the database during the block,
    counted by the driver itself (so SQLAlchemy's statements and those sent on a driver's
    own cursor alike): psycopg2 cursors of a recording class, SQLite's trace callback.
    The pool is emptied before and after, so that every connection of the block records."""
    from sqlalchemy import event

    sent: list[str] = []

    def checked_out(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if engine.dialect.name == "postgresql":
            dbapi_connection.cursor_factory = _recording_cursor(sent)
        else:
            dbapi_connection.set_trace_callback(sent.append)

    engine.dispose()
    event.listen(engine, "checkout", checked_out)
    try:
        yield sent
    finally:
        event.remove(engine, "checkout", checked_out)
        engine.dispose()


def _recording_cursor(sent: list[str]) -> type:
    import psycopg2.extensions

    class RecordingCursor(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> Any:  # noqa: A002  (psycopg2's name)
            sent.append(query if isinstance(query, str) else str(query))
            return super().execute(query, vars)

    return RecordingCursor


def pyjwt_decodes(monkeypatch: Any) -> list[str]:
    """The tokens PyJWT's `decode_complete` is given from now on (each call, in order)."""
    calls: list[str] = []
    real = jwt.decode_complete

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode_complete", counted)
    return calls
