"""GET /metrics: requests by endpoint and status, auth events, the database pool and the
circuit breaker, in Prometheus' text format; and the multiprocess mode that adds up the
worker processes (tests/e2e checks it under uWSGI)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import PASSWORD, base_settings, bearer
from prometheus_client.parser import text_string_to_metric_families

from authapp import create_app
from authapp.database import breaker, probe
from authapp.extensions import db
from config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def scrape(client, **headers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_of(samples, method: str, endpoint: str, status: str) -> float:
    return value(samples, "authapp_http_requests_total", method=method, endpoint=endpoint, status=status)


def test_metrics_is_prometheus_text(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    names = {family.name for family in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {
        "authapp_http_requests",
        "authapp_http_request_duration_seconds",
        "authapp_auth_events",
        "authapp_db_pool_connections_in_use",
        "authapp_db_pool_connections_open",
        "authapp_circuit_breaker_state",
    } <= names


def test_openmetrics_when_asked(client):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.get_data(as_text=True).endswith("# EOF\n")


def test_requests_are_counted_by_endpoint_and_status(client, tokens):
    before = scrape(client)
    for _ in range(3):
        assert client.get("/health/live").status_code == 200
    client.get("/auth/me", headers=bearer(tokens["access_token"]))
    client.get("/auth/me")
    client.get("/no/such/path")
    client.open("/health/live", method="BREW")
    sid = "00000000-0000-0000-0000-000000000000"
    client.delete(f"/auth/sessions/{sid}", headers=bearer(tokens["access_token"]))
    after = scrape(client)

    def delta(method, endpoint, status):
        return requests_of(after, method, endpoint, status) - requests_of(before, method, endpoint, status)

    assert delta("GET", "/health/live", "200") == 3
    assert delta("GET", "/auth/me", "200") == 1
    assert delta("GET", "/auth/me", "401") == 1
    # Unmatched paths and unknown methods share one label each: an attacker cannot make series.
    assert delta("GET", "<unmatched>", "404") == 1
    assert delta("OTHER", "<unmatched>", "405") == 1
    assert delta("DELETE", "/auth/sessions/{session_id}", "404") == 1
    assert not any("/no/such/path" in str(key) or sid in str(key) for key in after)
    # The previous scrape is counted too.
    assert delta("GET", "/metrics", "200") == 1

    count = "authapp_http_request_duration_seconds_count"
    live = {"method": "GET", "endpoint": "/health/live", "status": "200"}
    assert value(after, count, **live) - value(before, count, **live) == 3
    bucket = "authapp_http_request_duration_seconds_bucket"
    assert value(after, bucket, le="+Inf", **live) == value(after, count, **live)
    assert value(after, "authapp_http_request_duration_seconds_sum", **live) > value(
        before, "authapp_http_request_duration_seconds_sum", **live
    )


def test_auth_events_are_counted(client, later):
    before = scrape(client)
    body = {"email": "erin@example.com", "username": "erin", "password": PASSWORD}
    registered = client.post("/auth/register", json=body).get_json()
    client.post("/auth/login", json={"username": "erin", "password": PASSWORD})
    client.post("/auth/login", json={"username": "erin", "password": "not-" + PASSWORD})
    client.post("/auth/login", json={"username": "nobody", "password": PASSWORD})
    client.post("/auth/login", json={"username": "nobody", "password": PASSWORD})
    client.post("/auth/refresh", json={"refresh_token": registered["refresh_token"]})
    later(60)
    assert client.post("/auth/refresh", json={"refresh_token": registered["refresh_token"]}).status_code == 401
    after = scrape(client)

    def delta(event, reason=""):
        name = "authapp_auth_events_total"
        return value(after, name, event=event, reason=reason) - value(before, name, event=event, reason=reason)

    assert delta("register") == 1
    assert delta("login_success") == 1
    assert delta("login_failure", "wrong_password") == 1
    assert delta("login_failure", "unknown_user") == 2
    assert delta("refresh") == 1
    assert delta("refresh_reuse_detected") == 1
    assert delta("login_failure", "inactive_user") == 0
    assert ("authapp_auth_events_total", (("event", "login_failure"), ("reason", "inactive_user"))) in after


def test_pool_connections_in_use_and_open(app, client):
    def in_use():
        return value(scrape(client), "authapp_db_pool_connections_in_use")

    client.get("/health")  # at least one connection opened and returned
    assert in_use() == 0
    with app.app_context():
        connection = db.engine.connect()
        try:
            assert in_use() == 1
            assert value(scrape(client), "authapp_db_pool_connections_open") >= 1
        finally:
            connection.close()
        assert in_use() == 0


def test_breaker_state(app, client):
    def states():
        samples = scrape(client)
        return {s: value(samples, "authapp_circuit_breaker_state", state=s) for s in ("closed", "open", "half_open")}

    assert states() == {"closed": 1, "open": 0, "half_open": 0}
    with app.app_context():
        # The failures are made up: the background probe would find the database well
        # and close the breaker again before the scrape.
        probe().stop()
        for _ in range(app.config["CIRCUIT_BREAKER_THRESHOLD"]):
            breaker().before_call()
            breaker().record_failure()
    assert states() == {"closed": 0, "open": 1, "half_open": 0}
    with app.app_context():
        breaker().timeout = 0  # the next look moves it to half-open
    assert states() == {"closed": 0, "open": 0, "half_open": 1}


def test_metrics_is_documented(client):
    spec = client.get("/openapi.json").get_json()
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("bad", ["", "/no/such/directory"])
def test_a_bad_multiprocess_dir_stops_start_up(bad):
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        create_app(base_settings(PROMETHEUS_MULTIPROC_DIR=bad))


MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from authapp import create_app

    app = create_app({
        "ENVIRONMENT": "testing", "JWT_SECRET_KEY": "x" * 64, "BCRYPT_ROUNDS": "4",
        "DATABASE_URL": sys.argv[1], "PROMETHEUS_MULTIPROC_DIR": os.environ["PROMETHEUS_MULTIPROC_DIR"],
    })
    children = []
    for count in (3, 5):  # two worker processes, each with its own counters
        pid = os.fork()
        if pid == 0:
            client = app.test_client()
            for _ in range(count):
                assert client.get("/health/live").status_code == 200
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    sys.stdout.write(app.test_client().get("/metrics").get_data(as_text=True))
    """
)


def run_multiprocess(script: str, tmp_path: Path, database_url: str) -> tuple[Path, dict]:
    """Run `script` with a fresh PROMETHEUS_MULTIPROC_DIR; the samples of the /metrics it prints."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    result = subprocess.run(
        [sys.executable, "-c", script, database_url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return directory, samples


def test_multiprocess_mode_adds_up_the_processes(tmp_path, sqlite_template):
    """Each process counts in its own file; /metrics, served by a third, sums all of them."""
    directory, samples = run_multiprocess(MULTIPROCESS_SCRIPT, tmp_path, f"sqlite:///{sqlite_template}")
    assert requests_of(samples, "GET", "/health/live", "200") == 8
    assert len(list(directory.glob("counter_*.db"))) >= 2
    # A gauge of each process: the breaker is closed in the parent and both children.
    assert value(samples, "authapp_circuit_breaker_state", state="closed") == 3


STALE_POOL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from authapp import create_app
    from authapp.extensions import db

    app = create_app({
        "ENVIRONMENT": "testing", "JWT_SECRET_KEY": "x" * 64, "BCRYPT_ROUNDS": "4",
        "DATABASE_URL": sys.argv[1], "PROMETHEUS_MULTIPROC_DIR": os.environ["PROMETHEUS_MULTIPROC_DIR"],
    })
    pid = os.fork()
    if pid == 0:  # a worker: a burst that ends within the second
        client = app.test_client()
        with app.app_context():
            held = db.engine.connect()
            assert client.get("/health/live").status_code == 200  # writes in_use = 1
            held.close()
        assert client.get("/health").status_code == 200  # the last request of the burst
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    sys.stdout.write(app.test_client().get("/metrics").get_data(as_text=True))  # served by another
    """
)


def test_a_scrape_served_by_another_worker_sees_the_pool_as_the_last_request_left_it(tmp_path, sqlite_template):
    _, samples = run_multiprocess(STALE_POOL_SCRIPT, tmp_path, f"sqlite:///{sqlite_template}")
    assert value(samples, "authapp_db_pool_connections_in_use") == 0
    assert value(samples, "authapp_db_pool_connections_open") >= 1


def test_label_children_kept_per_method_route_and_status(app, client):
    """Metrics.series_of finds the children `labels()` gives, once per method, route and
    status; a method outside the known ones counts as OTHER and is not kept by its name."""
    from authapp.observability import metrics

    instruments = metrics.of(app)
    first = instruments.series_of("GET", "/auth/sessions/<session_id>", 200)
    assert first == (
        instruments.requests.labels("GET", "/auth/sessions/{session_id}", "200"),
        instruments.duration.labels("GET", "/auth/sessions/{session_id}", "200"),
    )
    assert instruments.series_of("GET", "/auth/sessions/<session_id>", 200) is first
    other = instruments.series_of("BREW", None, 405)
    assert other[0] is instruments.requests.labels("OTHER", "<unmatched>", "405")
    assert ("BREW", None, 405) not in instruments._by_request
    before = scrape(client)
    client.get("/health/live")
    client.open("/health/live", method="BREW")
    after = scrape(client)
    assert requests_of(after, "GET", "/health/live", "200") == requests_of(before, "GET", "/health/live", "200") + 1
    assert requests_of(after, "OTHER", "<unmatched>", "405") == requests_of(before, "OTHER", "<unmatched>", "405") + 1
