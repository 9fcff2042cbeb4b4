"""The API through nginx.conf's HTTPS server and three uWSGI instances on PostgreSQL:
the flows, the error envelope (the app's and nginx's own), the body limit, request ids,
client addresses, what is and is not exposed, and the logs."""

from __future__ import annotations

import json
import re
import time
import uuid

from prometheus_client.parser import text_string_to_metric_families

from devtools.stack import PASSWORD, app_log_entry, call

TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SPOOFED = "203.0.113.7"


def assert_envelope(reply, status: int, code: str) -> dict:
    body = reply.json()
    assert reply.status == status, (reply.status, body)
    assert body["error_code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert TIMESTAMP_RE.match(body["timestamp"]), body["timestamp"]
    assert UUID_RE.match(body["request_id"]), body["request_id"]
    assert reply.headers["X-Request-ID"] == body["request_id"]
    assert reply.headers["Content-Type"].startswith("application/json")
    return body


def app_log(stack) -> list[dict]:
    return [entry for instance in stack.instance.values() for entry in instance.log_entries()]


def request_lines(stack, request_id: str, *, app_expected: bool = True) -> tuple[list[dict], list[dict]]:
    """(the app's request log lines, nginx's access log lines) of one request id.

    Both logs are written as the response leaves, so they are read until the lines are
    there (or 10 s have passed)."""
    deadline = time.monotonic() + 10
    while True:
        app = [e for e in app_log(stack) if e.get("event") == "request" and e.get("request_id") == request_id]
        nginx = [e for e in stack.read_access_log() if e.get("request_id") == request_id]
        if (nginx and (app or not app_expected)) or time.monotonic() > deadline:
            return app, nginx
        time.sleep(0.05)


def test_register_login_refresh_me_sessions_logout(api):
    registered = api.register()
    name = registered["username"]
    me = api("GET", "/auth/me", token=registered["access_token"])
    assert me.status == 200 and me.json()["username"] == name

    by_email = api("POST", "/auth/login", json_body={"email": f"{name}@example.com", "password": PASSWORD})
    assert by_email.status == 200 and by_email.json()["user"]["last_login"]
    by_name = api("POST", "/auth/login", json_body={"username": name.upper(), "password": PASSWORD}).json()
    refreshed = api("POST", "/auth/refresh", json_body={"refresh_token": by_name["refresh_token"]})
    assert refreshed.status == 200
    pair = refreshed.json()
    assert pair["refresh_token"] != by_name["refresh_token"]

    sessions = api("GET", "/auth/sessions", token=pair["access_token"]).json()["sessions"]
    assert len(sessions) == 3 and sum(s["current"] for s in sessions) == 1

    assert api("POST", "/auth/logout", token=pair["access_token"]).status == 204
    assert_envelope(api("GET", "/auth/me", token=pair["access_token"]), 401, "TOKEN_REVOKED")
    assert api("POST", "/auth/logout-all", token=registered["access_token"]).status == 204
    assert_envelope(api("GET", "/auth/me", token=registered["access_token"]), 401, "TOKEN_REVOKED")
    assert_envelope(
        api("POST", "/auth/login", json_body={"username": name, "password": "wrong-" + PASSWORD}),
        401,
        "INVALID_CREDENTIALS",
    )


def test_errors_keep_the_envelope(api):
    registered = api.register()
    malformed = api("POST", "/auth/login", body=b'{"username": ', headers={"Content-Type": "application/json"})
    assert assert_envelope(malformed, 400, "VALIDATION_ERROR")["errors"] == {"_body": ["Malformed JSON."]}
    assert_envelope(api("POST", "/auth/login", body=b"username=x", headers={"Content-Type": "text/plain"}), 415,
                    "UNSUPPORTED_MEDIA_TYPE")  # fmt: skip
    missing = api("GET", "/auth/me")
    assert_envelope(missing, 401, "MISSING_TOKEN")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert_envelope(api("GET", "/auth/no-such-thing"), 404, "NOT_FOUND")
    assert_envelope(api("PUT", "/auth/login", json_body={}), 405, "METHOD_NOT_ALLOWED")
    duplicate = {"email": f"{registered['username']}@example.com", "username": "other", "password": PASSWORD}
    assert_envelope(api("POST", "/auth/register", json_body=duplicate), 409, "USER_ALREADY_EXISTS")


def test_the_body_limit_is_the_apps_64_kib(api, stack):
    def post(size: int):
        body = b'{"x": "' + b"a" * (size - 9) + b'"}'
        assert len(body) == size
        return api("POST", "/auth/login", body=body, headers={"Content-Type": "application/json"})

    # 64 KiB passes nginx and reaches the app, which judges it (an unknown field).
    at_limit = post(64 * 1024)
    assert assert_envelope(at_limit, 400, "VALIDATION_ERROR")["errors"]
    # One byte more: nginx answers itself, in the API's envelope, and the app never sees it.
    over = post(64 * 1024 + 1)
    body = assert_envelope(over, 413, "PAYLOAD_TOO_LARGE")
    app_lines, nginx_lines = request_lines(stack, body["request_id"], app_expected=False)
    assert app_lines == []
    assert [line["status"] for line in nginx_lines] == [413]


def test_request_ids_pass_through_nginx_and_the_app(api, stack):
    mine = str(uuid.uuid4())
    kept = api("GET", "/health/live", headers={"X-Request-ID": mine})
    assert kept.headers["X-Request-ID"] == mine
    app_lines, nginx_lines = request_lines(stack, mine)
    assert len(app_lines) == 1 and len(nginx_lines) == 1

    # A malformed id, or none: nginx makes one, the app keeps it, both logs carry it.
    for headers in ({"X-Request-ID": "not-a-uuid'; DROP"}, {}):
        reply = api("GET", "/health/live", headers=headers)
        request_id = reply.headers["X-Request-ID"]
        assert UUID_RE.match(request_id)
        app_lines, nginx_lines = request_lines(stack, request_id)
        assert len(app_lines) == 1 and len(nginx_lines) == 1, (app_lines, nginx_lines)


def test_forwarding_headers_cannot_change_the_client_address(api, stack):
    spoofing = {"X-Forwarded-For": SPOOFED, "X-Real-IP": SPOOFED, "Forwarded": f"for={SPOOFED}"}
    registered = api.register(source_address="127.0.0.2", headers=spoofing)
    login = api(
        "POST",
        "/auth/login",
        json_body={"username": registered["username"], "password": PASSWORD},
        source_address="127.0.0.3",
        headers=spoofing,
    )
    assert login.status == 200
    sessions = api("GET", "/auth/sessions", token=registered["access_token"]).json()["sessions"]
    assert sorted(s["ip"] for s in sessions) == ["127.0.0.2", "127.0.0.3"]
    app_lines, nginx_lines = request_lines(stack, login.headers["X-Request-ID"])
    assert [line["client_addr"] for line in app_lines] == ["127.0.0.3"]
    assert [line["client_addr"] for line in nginx_lines] == ["127.0.0.3"]
    audit = [
        e
        for e in app_log(stack)
        if e.get("event") == "login_success" and e.get("user_id") == login.json()["user"]["id"]
    ]
    assert [e["client_addr"] for e in audit] == ["127.0.0.3"]


def test_https_only_and_hsts(api, stack):
    redirect = call(stack.http_url, "GET", "/auth/me?x=1")
    assert redirect.status == 301
    assert redirect.headers["Location"].startswith("https://") and redirect.headers["Location"].endswith("/auth/me?x=1")
    for reply in (api("GET", "/health/live"), api("GET", "/metrics")):
        assert reply.headers["Strict-Transport-Security"] == "max-age=63072000"
    assert "nginx/" not in api("GET", "/health/live").headers.get("Server", "")


def test_metrics_are_served_on_loopback_per_instance_only(api, stack):
    assert_envelope(api("GET", "/metrics"), 404, "NOT_FOUND")
    for number in stack.instance:
        reply = call(stack.metrics_url(number))
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        assert b"authapp_http_requests_total" in reply.body
    assert call(stack.metrics_url(99)).status in (502, 503, 404)


def live_requests(stack, number: int) -> float:
    text = call(stack.metrics_url(number)).body.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name, labels.get("endpoint"), labels.get("status")) == (
                "authapp_http_requests_total",
                "/health/live",
                "200",
            ):
                return sample.value
    return 0.0


def test_metrics_add_up_every_worker_of_every_instance(api, stack):
    before = {n: live_requests(stack, n) for n in stack.instance}
    for _ in range(60):
        assert api("GET", "/health/live").status == 200
    after = {}
    for number in stack.instance:
        # Each scrape is served by any of the instance's workers: all must agree.
        seen = {live_requests(stack, number) for _ in range(6)}
        assert len(seen) == 1, (number, seen)
        after[number] = seen.pop()
    assert sum(after.values()) - sum(before.values()) == 60
    assert all(after[n] > before[n] for n in stack.instance), (before, after)  # least_conn used all three


def test_app_logs_are_json_lines_without_secrets_and_none_is_lost(api, stack):
    registered = api.register()
    refreshed = api("POST", "/auth/refresh", json_body={"refresh_token": registered["refresh_token"]}).json()
    api("POST", "/auth/login", json_body={"username": registered["username"], "password": "wrong-" + PASSWORD})
    secrets = [PASSWORD]
    for body in (registered, refreshed):
        for token in (body["access_token"], body["refresh_token"]):
            secrets += [token, *token.split(".")[1:]]

    app_request_ids = set()
    for instance in stack.instance.values():
        text = instance.log.read_text()
        assert "Logging error" not in text and "Traceback" not in text
        for line in text.splitlines():
            # The app's lines are whole JSON objects; uWSGI's own messages are plain text.
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == "request":
                    app_request_ids.add(entry["request_id"])
        for secret in secrets:
            assert secret not in text
    access = stack.access_log.read_text()
    proxied = [json.loads(line) for line in access.splitlines()]
    for secret in secrets:
        assert secret not in access
    # Every request nginx passed to an instance has its line in the app's log.
    deadline = time.monotonic() + 10
    while True:
        missing = {e["request_id"] for e in proxied if e["upstream"]} - app_request_ids
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
        app_request_ids |= {
            entry["request_id"]
            for instance in stack.instance.values()
            for line in instance.log.read_text().splitlines()
            if (entry := app_log_entry(line)).get("event") == "request"
        }
    assert not missing


def test_database_connections_peak_at_instances_times_processes_times_threads(api, stack, admin_url):
    """The peak the docs' arithmetic gives (resilience.md, "Connections"), measured: every
    instance's every worker busy on every thread, and the server's connections to the
    stack's database counted every 20 ms (one more for the mail courier)."""
    import os
    import threading

    from sqlalchemy.engine import make_url

    from devtools.postgres import admin_connection
    from devtools.stack import traffic

    user = api.register()
    me = ("GET", "/auth/me", None, {"Authorization": f"Bearer {user['access_token']}"})
    login = ("POST", "/auth/login", {"username": user["user"]["username"], "password": PASSWORD}, {})
    database = make_url(stack.database_url).database
    counts: list[int] = []
    done = threading.Event()

    def sample() -> None:
        with admin_connection(make_url(admin_url)) as conn, conn.cursor() as cur:
            while not done.is_set():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,))
                counts.append(cur.fetchone()[0])
                time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        outcomes = traffic(stack.https_url, [me, me, me, login], threads=48, seconds=6, tls=stack.tls_context())
    finally:
        done.set()
        sampler.join(timeout=10)
    assert outcomes and all(o.status == 200 for o in outcomes), {o.status for o in outcomes}
    bound = stack.instances * (os.cpu_count() or 1) * 2  # uwsgi.ini: processes = %k, threads = 2
    assert counts, "no sample taken"
    assert max(counts) <= bound + 1, (max(counts), bound)
    print(f"\n{len(outcomes)} requests; connections to the database: peak {max(counts)} of "
          f"{bound} (+1 for the courier), {len(counts)} samples")  # fmt: skip
