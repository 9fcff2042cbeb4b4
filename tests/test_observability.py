"""One JSON log line per request, with its fields; never a password, hash or token."""

from __future__ import annotations

import copy
import io
import json
import logging
from contextlib import contextmanager

from helpers import PASSWORD, bearer, sid_of

from authapp.extensions import db
from authapp.models import User
from authapp.observability import logs
from authapp.observability.logs import make_handler


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
    changed = client.post(
        "/auth/change-password",
        headers=bearer(refreshed["access_token"]),
        json={"current_password": PASSWORD, "new_password": "granite-meadow-lantern-7"},
    ).get_json()
    client.post(
        "/auth/logout", headers=bearer(changed["access_token"]), json={"refresh_token": changed["refresh_token"]}
    )
    with app.app_context():
        hashed = db.session.scalar(db.select(User.hashed_password))

    text = json.dumps(log_lines())
    assert len(log_lines()) >= 7
    secrets = [PASSWORD, hashed, hashed[7:29]]
    secrets.append("granite-meadow-lantern-7")
    for body in (registered, refreshed, changed):
        secrets += [body["access_token"], body["refresh_token"]]
        secrets += [part for token in (body["access_token"], body["refresh_token"]) for part in token.split(".")[1:]]
    for secret in secrets:
        assert secret not in text


def test_audit_trail(client, log_lines, later):
    body = {"email": "dan@example.com", "username": "dan", "password": PASSWORD}
    first = client.post("/auth/register", json=body).get_json()
    client.post("/auth/login", json={"username": "dan", "password": "wrong-password-99"})
    client.post("/auth/login", json={"username": "nobody", "password": PASSWORD})
    second = client.post("/auth/login", json={"username": "dan", "password": PASSWORD}).get_json()
    rotated = client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]}).get_json()
    client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})  # replay inside the interval
    client.delete(f"/auth/sessions/{sid_of(first)}", headers=bearer(rotated["access_token"]))
    changed = client.post(
        "/auth/change-password",
        headers=bearer(rotated["access_token"]),
        json={"current_password": PASSWORD, "new_password": "granite-meadow-lantern-7"},
    ).get_json()
    client.post("/auth/logout", headers=bearer(changed["access_token"]))
    third = client.post("/auth/login", json={"username": "dan", "password": "granite-meadow-lantern-7"}).get_json()
    client.post("/auth/refresh", json={"refresh_token": third["refresh_token"]})
    later(60)
    client.post("/auth/refresh", json={"refresh_token": third["refresh_token"]})  # theft

    events = [entry for entry in log_lines() if entry.get("audit")]
    names = [e["event"] for e in events]
    assert names == [
        "register",
        "mail_queued",  # the verification link (EMAIL_VERIFICATION=optional)
        "login_failure",
        "login_failure",
        "login_success",
        "refresh",
        "refresh_replay_within_interval",
        "session_revoked",
        "password_changed",
        "mail_queued",  # the notice that the password changed
        "logout",
        "login_success",
        "refresh",
        "refresh_reuse_detected",
    ]
    reasons = [e.get("reason") for e in events if e["event"] == "login_failure"]
    assert reasons == ["wrong_password", "unknown_user"]
    for event in events:
        assert event["request_id"] and event["client_addr"] == "127.0.0.1"
        if event["event"] != "login_failure" or event["reason"] != "unknown_user":
            assert event["user_id"] == first["user"]["id"]
    assert all(e["sid"] for e in events if e["event"] not in ("login_failure", "mail_queued"))


def test_database_errors_do_not_log_their_parameters(app, log_lines):
    """A crash inside a statement logs its traceback, but never the statement's values."""
    from authapp.database import unit_of_work

    known_hash = "$2b$04$" + "S" * 53

    def crash():
        with unit_of_work() as session:
            session.add(User(email=None, username="nobody", hashed_password=known_hash))

    app.add_url_rule("/crash", view_func=crash)
    response = app.test_client().get("/crash")
    assert response.status_code == 500
    text = json.dumps(log_lines())
    assert "IntegrityError" in text and "Traceback" in text
    assert known_hash not in text and "nobody" not in text


def _request_fields(**overrides):
    fields = {
        "event": "request",
        "method": "GET",
        "path": "/auth/me",
        "status": 200,
        "duration_ms": 0.42,
        "user_id": "6b3f2f2e-0d7e-4f69-9c1e-8d3c1b2a9f10",
        "client_addr": "127.0.0.1",
        "request_id": "12345678-1234-4234-8234-123456789abc",
    }
    fields.update(overrides)
    return fields


def test_written_out_request_line_is_the_formatters_own():
    """The request's line written out (logs.format_request_line) is, byte for byte, what
    python-json-logger writes for the same record through `logger.info(extra=...)`."""
    logger = logging.getLogger("authapp.request")
    formatter = make_handler(io.StringIO()).formatter
    assert formatter.request_lines_written_out
    for fields in (_request_fields(), _request_fields(user_id=None, status=404, path="/reset/eyJa.eyJb.c")):
        fast = logs.RequestLineRecord(logger.name, dict(fields))
        generic = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "request", (), None, extra=fields)
        generic.created, generic.msecs = fast.created, fast.msecs
        assert set(fast.__dict__) == set(generic.__dict__)
        assert formatter.format(fast) == logs.RedactingJsonFormatter.format(_generic_only(formatter), generic)
    line = json.loads(formatter.format(logs.RequestLineRecord(logger.name, _request_fields(path="/r/eyJa.eyJb.c"))))
    assert list(line) == ["level", "logger", "message", *logs.REQUEST_LINE_FIELDS, "timestamp"]
    assert line["path"] == "/r/[redacted token]"


def _generic_only(formatter):
    """The same formatter, with python-json-logger's own path for every record."""
    clone = copy.copy(formatter)
    clone.request_lines_written_out = False
    return clone


def test_request_line_through_every_handler(app, client):
    """log_request_line goes through the logger's filters and handlers as logger.info does."""
    stream = io.StringIO()
    seen = []
    plain = logging.Handler()
    plain.emit = seen.append
    logger = logging.getLogger("authapp")
    logger.addHandler(handler := make_handler(stream))
    logger.addHandler(plain)
    try:
        client.get("/health/live")
        logging.getLogger("authapp.request").setLevel(logging.WARNING)
        client.get("/health/live")
    finally:
        logging.getLogger("authapp.request").setLevel(logging.NOTSET)
        logger.removeHandler(handler)
        logger.removeHandler(plain)
    assert len(stream.getvalue().splitlines()) == 1
    (record,) = [r for r in seen if r.getMessage() == "request"]
    assert record.levelname == "INFO" and record.path == "/health/live" and record.request_id


def test_the_stderr_handler_writes_one_line_to_the_current_stderr(monkeypatch):
    """logs.configure's handler writes each record as one line to whatever sys.stderr is
    when the record comes, and a stream that fails goes to Handler.handleError."""
    handler = logs.make_handler(None)
    record = logs.RequestLineRecord("authapp.request", _request_fields())
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    handler.handle(record)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["request_id"] == _request_fields()["request_id"]
    failed = []
    monkeypatch.setattr(handler, "handleError", failed.append)
    monkeypatch.setattr("sys.stderr", None)
    handler.handle(record)
    assert failed == [record]


SECRET_SAMPLES = [
    "$2b$12$" + "a" * 53,
    "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl",
    "Failing row contains (1, alice, $2b$12$x)",
    "Key (email)=(alice@example.com)",
]


def test_a_request_line_is_redacted_as_any_line(app):
    """A secret in any field a caller sends (method, path, client address) is redacted
    from the request's line written out as from the formatter's generic line."""
    logger = logging.getLogger("authapp.request")
    formatter = make_handler(io.StringIO()).formatter
    for secret in SECRET_SAMPLES:
        for name, value in (("path", f"/r/{secret}/x"), ("method", secret.upper()), ("client_addr", secret)):
            fields = _request_fields(**{name: value})
            fast = logs.RequestLineRecord(logger.name, dict(fields))
            generic = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "request", (), None, extra=fields)
            generic.created, generic.msecs = fast.created, fast.msecs
            written = formatter.format(fast)
            assert written == logs.RedactingJsonFormatter.format(_generic_only(formatter), generic)
            if name == "path":
                assert secret not in written and "redacted" in written


@contextmanager
def as_configured():
    """The handlers as logs.configure leaves them (pytest adds capturing ones for each test's call)."""
    parent = logging.getLogger("authapp")
    saved = parent.handlers
    (ours,) = [h for h in saved if type(h) is logs._StderrHandler]
    parent.handlers = [ours]
    try:
        yield ours
    finally:
        parent.handlers = saved


def test_the_line_written_straight_to_stderr_is_the_records_line(app, client, capsys):
    """With the handlers as logs.configure sets them up, a request's line is written to
    stderr without a record: the same text as the record's line, secrets redacted too."""
    logger = logging.getLogger("authapp.request")
    with as_configured() as ours:
        handler = logs._sole_stderr_handler(logger)
        assert handler is ours  # the app's own set-up: the straight path is the one taken
        for fields in (_request_fields(), _request_fields(path="/r/eyJa.eyJb.c", user_id=None, status=404)):
            record = logs.RequestLineRecord(logger.name, dict(fields))
            assert handler.formatter.request_line(logger.name, fields, record.created) == handler.format(record)
        capsys.readouterr()
        client.get("/health/live", headers={"X-Request-ID": "3fa85f64-5717-4562-b3fc-2c963f66afa6"})
    (line,) = [json.loads(text) for text in capsys.readouterr().err.splitlines() if '"request"' in text]
    assert line["path"] == "/health/live" and line["request_id"] == "3fa85f64-5717-4562-b3fc-2c963f66afa6"
    assert list(line) == ["level", "logger", "message", *logs.REQUEST_LINE_FIELDS, "timestamp"]


def test_any_other_handler_or_filter_takes_the_records_way(app):
    with as_configured():
        _each_change_takes_the_records_way()


def _each_change_takes_the_records_way():
    logger, parent = logging.getLogger("authapp.request"), logging.getLogger("authapp")
    assert logs._sole_stderr_handler(logger) is not None
    extra = logging.NullHandler()
    for add, remove in (
        (lambda: parent.addHandler(extra), lambda: parent.removeHandler(extra)),
        (lambda: logger.addHandler(extra), lambda: logger.removeHandler(extra)),
        (lambda: parent.addFilter(str), lambda: parent.removeFilter(str)),
        (lambda: parent.handlers[0].addFilter(str), lambda: parent.handlers[0].removeFilter(str)),
        (lambda: parent.handlers[0].setLevel(logging.WARNING), lambda: parent.handlers[0].setLevel(logging.NOTSET)),
    ):
        add()
        try:
            assert logs._sole_stderr_handler(logger) is None
        finally:
            remove()
    assert logs._sole_stderr_handler(logger) is not None


def test_a_failing_stderr_never_fails_the_request(app, client, monkeypatch):
    failed = []
    with as_configured() as ours:
        assert logs._sole_stderr_handler(logging.getLogger("authapp.request")) is ours
        monkeypatch.setattr(ours, "handleError", failed.append)
        monkeypatch.setattr("sys.stderr", None)
        assert client.get("/health/live").status_code == 200
    (record,) = failed
    assert record.path == "/health/live" and record.status == 200
