"""One JSON log line per request, with its fields; never a password, hash or token."""

from __future__ import annotations

import io
import json
import logging

import pytest
from helpers import PASSWORD, bearer

from authapp.extensions import db
from authapp.models import User
from authapp.observability.logs import make_handler


@pytest.fixture
def log_lines():
    """Everything the app logs during the test, as parsed JSON objects."""
    stream = io.StringIO()
    handler = make_handler(stream)
    logger = logging.getLogger("authapp")
    logger.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)


def test_request_line_fields(client, tokens, log_lines):
    response = client.get("/auth/me", headers=bearer(tokens["access_token"]))
    (line,) = [entry for entry in log_lines() if entry.get("event") == "request"]
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["method"] == "GET" and line["path"] == "/auth/me" and line["status"] == 200
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["user_id"] == tokens["user"]["id"]
    assert line["client_addr"] == "127.0.0.1"
    assert line["level"] == "INFO" and line["timestamp"]


def test_no_secret_reaches_the_log(app, client, log_lines):
    registered = client.post(
        "/auth/register", json={"email": "carol@example.com", "username": "carol", "password": PASSWORD}
    ).get_json()
    client.post("/auth/login", json={"username": "carol", "password": PASSWORD})
    client.post("/auth/login", json={"username": "carol", "password": "wrong-" + PASSWORD})
    refreshed = client.post("/auth/refresh", json={"refresh_token": registered["refresh_token"]}).get_json()
    client.get("/auth/me", headers=bearer(refreshed["access_token"]))
    client.get("/auth/me", headers=bearer(registered["refresh_token"]))
    client.post("/auth/register", json={"email": "bad", "username": "x", "password": PASSWORD + "!"})
    with app.app_context():
        hashed = db.session.scalar(db.select(User.hashed_password))

    text = json.dumps(log_lines())
    assert len(log_lines()) >= 7
    secrets = [PASSWORD, hashed, hashed[7:29]]
    for body in (registered, refreshed):
        secrets += [body["access_token"], body["refresh_token"]]
        secrets += [
            part for token in (body["access_token"], body["refresh_token"]) for part in token.split(".")[1:]
        ]
    for secret in secrets:
        assert secret not in text
