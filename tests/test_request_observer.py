"""The request observer (observability.requests.RequestObserver), the WSGI middleware that
gives every request its id, security headers, count and one log line: exactly once per
request on every path, with the fields the request hooks it replaced wrote."""

from __future__ import annotations

import logging
import uuid

import pytest
from flask import Response, g, request, stream_with_context
from helpers import bearer

from authapp import database, security
from authapp.observability import metrics
from authapp.observability.logs import REQUEST_LINE_FIELDS
from authapp.observability.requests import REQUEST_ID_HEADER, RequestObserver

ORIGIN = "https://app.example.com"


@pytest.fixture
def lines():
    """The request lines (records) logged during the test."""
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "request":
                seen.append(record)

    handler = Collect()
    logger = logging.getLogger("authapp.request")
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


@pytest.fixture
def old_lines(app):
    """The fields the request hooks wrote before the observer, computed the way they did
    (an after-request hook reading `request`, `g` and the response)."""
    seen: list[dict] = []

    @app.after_request
    def old_finish(response):
        auth = g.get("auth")
        seen.append(
            {
                "event": "request",
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "user_id": auth.user_id if auth is not None else None,
                "client_addr": request.remote_addr,
                "request_id": g.request_id,
            }
        )
        return response

    return seen


def counted(app, method: str, endpoint: str, status: int) -> float:
    registry = metrics.of(app).registry
    labels = {"method": method, "endpoint": endpoint, "status": str(status)}
    return registry.get_sample_value("authapp_http_requests_total", labels) or 0.0


def fields_of(record: logging.LogRecord) -> dict:
    return {name: getattr(record, name) for name in REQUEST_LINE_FIELDS}


@pytest.fixture
def boom(app):
    """A route that fails with an exception the error handler answers (500 INTERNAL_ERROR)."""

    def boom():
        raise RuntimeError("boom")

    app.add_url_rule("/boom", view_func=boom)


def test_one_line_with_the_old_fields_on_every_path(app, boom, old_lines, client, tokens, lines):
    old_lines.clear()  # the registration's
    access = bearer(tokens["access_token"])
    answers = [
        client.get("/health/live"),
        client.head("/health/live"),
        client.get("/auth/me", headers=access),
        client.get("/auth/me"),
        client.get("/no/such/path/\u00e9"),
        client.get("/auth/login"),
        client.open("/health/live", method="BREW"),
        client.get("/boom"),
        client.get("/docs"),
        client.get("/health/live", headers={REQUEST_ID_HEADER: "12345678-1234-4234-8234-123456789abc"}),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 401, 404, 405, 405, 500, 200, 200]
    assert len(lines) == len(old_lines) == len(answers)
    for record, old, answer in zip(lines, old_lines, answers, strict=True):
        new = fields_of(record)
        duration = new.pop("duration_ms")
        assert isinstance(duration, float) and duration >= 0
        assert new == old
        assert new["request_id"] == answer.headers[REQUEST_ID_HEADER]
        assert list(fields_of(record)) == list(REQUEST_LINE_FIELDS)
    assert lines[2].user_id == tokens["user"]["id"] and lines[3].user_id is None
    assert lines[4].path == "/no/such/path/\u00e9"
    assert lines[-1].request_id == "12345678-1234-4234-8234-123456789abc"


def test_one_count_per_request_with_the_matched_route(app, client, tokens):
    series = [
        ("GET", "/health/live", 200),
        ("HEAD", "/health/live", 200),
        ("GET", "/auth/me", 401),
        ("GET", metrics.UNMATCHED, 404),
        ("GET", metrics.UNMATCHED, 405),
    ]
    before = [counted(app, *labels) for labels in series]
    client.get("/health/live")
    client.head("/health/live")
    client.get("/auth/me")
    client.get("/nowhere")
    client.get("/auth/login")
    after = [counted(app, *labels) for labels in series]
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "settings", [{"RATELIMIT_ENABLED": "true", "LOGIN_RATE_LIMIT": "1/minute", "LOGIN_MAX_FAILURES": "100"}]
)
def test_a_refused_request_has_its_line_and_count(app, client, lines):
    login = {"username": "nobody", "password": "wrong password 1234"}
    statuses = [client.post("/auth/login", json=login).status_code for _ in range(2)]
    assert statuses == [401, 429]
    assert [line.status for line in lines] == [401, 429]
    assert counted(app, "POST", "/auth/login", 429) == 1


@pytest.mark.parametrize("settings", [{"CORS_ORIGINS": ORIGIN}])
def test_a_cors_preflight_has_its_line_its_id_and_its_headers(client, lines):
    answer = client.options(
        "/auth/me",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "X-Request-ID",
        },
    )
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    ((record),) = lines
    assert record.method == "OPTIONS" and record.status == 200
    assert record.request_id == answer.headers[REQUEST_ID_HEADER]
    assert answer.headers["Cache-Control"] == "no-store"


def test_a_streamed_answer_is_counted_when_it_starts(app, lines):
    lines_before_the_body = []

    def stream():
        def parts():
            lines_before_the_body.append(len(lines))
            yield "a"
            yield "b"

        return Response(stream_with_context(parts()))

    app.add_url_rule("/stream", view_func=stream)
    answer = app.test_client().get("/stream")
    assert answer.get_data(as_text=True) == "ab"
    assert lines_before_the_body == [1] and len(lines) == 1 and lines[0].status == 200


def test_an_exception_escaping_the_app_is_one_500_line(app, lines):
    inner = app.wsgi_app.wsgi_app

    def crash(environ, start_response):
        inner(environ, lambda *args: None)  # Flask answers, then something below it fails
        raise RuntimeError("lost")

    app.wsgi_app.wsgi_app = crash
    try:
        with pytest.raises(RuntimeError):
            app.test_client().get("/health/live")
    finally:
        app.wsgi_app.wsgi_app = inner
    ((record),) = lines  # the observer's start_response was never called: a 500 on the way out
    assert record.status == 500 and record.path == "/health/live"


def test_an_exception_before_flask_answers_is_one_500_line(app, lines):
    def crash(environ, start_response):
        raise OSError("the client went away while its body was read")

    inner = app.wsgi_app.wsgi_app
    app.wsgi_app.wsgi_app = crash
    try:
        with pytest.raises(OSError):
            app.test_client().get("/health/live?x=1", headers={REQUEST_ID_HEADER: str(uuid.uuid4())})
    finally:
        app.wsgi_app.wsgi_app = inner
    ((record),) = lines
    assert (record.method, record.path, record.status, record.client_addr) == ("GET", "/health/live", 500, "127.0.0.1")
    assert counted(app, "GET", metrics.UNMATCHED, 500) == 1


def test_security_headers_and_request_id_on_every_answer(client):
    for path, expected in (("/health/live", security.API_POLICY), ("/docs", security.DOCS_POLICY)):
        answer = client.get(path)
        assert answer.headers["Content-Security-Policy"] == expected
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert len(answer.headers.getlist(REQUEST_ID_HEADER)) == 1
    assert client.get("/auth/me").headers["Cache-Control"] == "no-store"
    assert "Cache-Control" not in client.get("/health/live").headers


def test_the_observer_wraps_the_whole_app(app):
    assert isinstance(app.wsgi_app, RequestObserver)
    hooks = [*app.before_request_funcs.get(None, []), *app.after_request_funcs.get(None, [])]
    assert database.begin_request not in hooks  # the observer resets it
    assert not any(getattr(f, "__module__", "").startswith("authapp.observability") for f in hooks)


def test_g_request_id_outside_a_request(app):
    with app.app_context():
        assert g.request_id is None
    with app.test_request_context("/"):
        assert g.request_id is None  # no observer ran: no id
