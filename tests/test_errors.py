"""The error envelope from every layer, and the request id on every response."""

from __future__ import annotations

import uuid

import pytest
from helpers import PASSWORD, TIMESTAMP_RE, assert_error, base_settings

from authapp import create_app

UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2"


def test_unknown_path(client):
    assert_error(client.get("/no/such/path"), 404, "NOT_FOUND")


def test_wrong_method(client):
    response = client.get("/auth/login")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in response.headers["Allow"]


def test_unhandled_exception_hides_its_cause(app, capsys):
    def boom():
        raise RuntimeError("secret internals: db password is hunter2")

    app.add_url_rule("/boom", view_func=boom)
    response = app.test_client().get("/boom")
    body = assert_error(response, 500, "INTERNAL_ERROR")
    assert "hunter2" not in response.get_data(as_text=True)
    assert body["detail"] == "Internal server error"
    log = capsys.readouterr().err
    assert "Traceback" in log and "RuntimeError" in log and body["request_id"] in log


@pytest.fixture
def dead_db_app():
    return create_app(base_settings(DATABASE_URL=UNREACHABLE_DB, CIRCUIT_BREAKER_THRESHOLD=3))


def test_database_down_is_503_then_breaker_opens(dead_db_app):
    client = dead_db_app.test_client()
    login = {"username": "alice", "password": PASSWORD}
    for _ in range(3):
        response = client.post("/auth/login", json=login)
        assert_error(response, 503, "SERVICE_UNAVAILABLE")
        assert int(response.headers["Retry-After"]) > 0
    response = client.post("/auth/login", json=login)
    assert_error(response, 503, "CIRCUIT_BREAKER_OPEN")
    assert 0 < int(response.headers["Retry-After"]) <= 60


def test_health_reports_the_database(client, dead_db_app):
    ok = client.get("/health")
    assert ok.status_code == 200
    body = ok.get_json()
    assert body["status"] == "healthy" and body["checks"] == {"database": "ok", "circuit_breaker": "closed"}
    assert TIMESTAMP_RE.match(body["timestamp"]) and body["version"]

    down = dead_db_app.test_client().get("/health")
    assert down.status_code == 503
    assert down.get_json()["status"] == "unhealthy"
    assert down.get_json()["checks"]["database"] == "error"
    assert down.headers["X-Request-ID"]


def test_liveness_never_touches_the_database(dead_db_app):
    response = dead_db_app.test_client().get("/health/live")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "alive" and TIMESTAMP_RE.match(body["timestamp"])


def test_valid_incoming_request_id_is_kept(client):
    rid = str(uuid.uuid4())
    response = client.get("/no/such/path", headers={"X-Request-ID": rid})
    assert response.headers["X-Request-ID"] == rid
    assert response.get_json()["request_id"] == rid


@pytest.mark.parametrize(
    "sent", ["hello", "x" * 200, "<script>", "1; DROP TABLE users", "{12345678-1234-1234-1234-123456789abc}"]
)
def test_malformed_incoming_request_id_is_replaced(client, sent):
    response = client.get("/health/live", headers={"X-Request-ID": sent})
    assert response.headers["X-Request-ID"] != sent
    uuid.UUID(response.headers["X-Request-ID"])


def test_incoming_request_id_comes_back_unchanged(client):
    rid = str(uuid.uuid4()).upper()
    assert client.get("/health/live", headers={"X-Request-ID": rid}).headers["X-Request-ID"] == rid


def test_every_response_has_a_request_id(client, tokens):
    for response in (client.get("/health/live"), client.get("/health"), client.get("/openapi.json")):
        uuid.UUID(response.headers["X-Request-ID"])
