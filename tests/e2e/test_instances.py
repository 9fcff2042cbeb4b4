"""Several instances behind nginx: one dies mid-traffic, one is stopped (as systemd does),
workers are recycled, a bad setting stops an instance."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from devtools.stack import PASSWORD, UWSGI_INI, Api, call, find_binary, running_stack, traffic


def mixed_requests(api: Api) -> list:
    """Reads nginx may retry on another instance, and logins it must not retry (POST)."""
    user = api.register()
    login = {"username": user["username"], "password": PASSWORD}
    me = ("GET", "/auth/me", None, {"Authorization": f"Bearer {user['access_token']}"})
    return [me, ("POST", "/auth/login", login, {})]


def traffic_around(api: Api, action, *, seconds: float = 8, at: float = 3):
    """Traffic from 8 client threads; `action()` runs `at` seconds in. Returns the
    outcomes and the (start, end) of the action on the same clock."""
    results: dict = {}
    requests = mixed_requests(api)
    runner = threading.Thread(
        target=lambda: results.update(
            outcomes=traffic(api.base_url, requests, threads=8, seconds=seconds, tls=api.stack.tls_context())
        )
    )
    runner.start()
    time.sleep(at)
    began = time.monotonic()
    action()
    ended = time.monotonic()
    runner.join()
    return results["outcomes"], (began, ended)


def served_by(stack, number: int, since_line: int = 0) -> int:
    socket = str(stack.instance[number].socket)
    return sum(
        1
        for entry in stack.read_access_log()[since_line:]
        if entry.get("upstream", "").endswith(socket) and entry["status"] == 200
    )


def test_an_instance_killed_mid_traffic_fails_only_the_requests_in_flight(stack):
    api = Api(stack, stack.https_url)
    marks: dict = {}

    def crash() -> None:
        marks["before"] = served_by(stack, 2)
        stack.kill_instance(2)

    outcomes, (killed, reaped) = traffic_around(api, crash)
    assert marks["before"] > 0, "instance 2 had no traffic before it was killed"
    failed = [o for o in outcomes if o.status != 200]
    after = [o for o in outcomes if o.started > reaped]
    assert len(after) > 50 and all(o.status == 200 for o in after)
    # Only requests in flight when the instance died may fail, and only POSTs: nginx
    # retries a read on another instance, never a login it had already passed on.
    for outcome in failed:
        assert outcome.started < reaped and outcome.ended > killed, outcome
        assert outcome.method == "POST" and outcome.status == 503, outcome
    log = stack.read_access_log()
    socket = f"unix:{stack.instance[2].socket}"
    for outcome in failed:
        (line,) = [e for e in log if e["request_id"] == outcome.request_id]
        assert (line["upstream"], line["upstream_status"]) == (socket, "502"), line

    # Once nginx's fail_timeout (10 s) has passed it tries the dead instance again: the
    # connection is refused, and even a POST goes on to the next instance.
    time.sleep(11)
    mark = len(stack.read_access_log())
    login = mixed_requests(api)[1]
    for _ in range(6):
        assert api("POST", "/auth/login", json_body=login[2]).status == 200
    failovers = [e for e in stack.read_access_log()[mark:] if e["upstream"].startswith(f"{socket}, ")]
    assert failovers and all(e["status"] == 200 and e["method"] == "POST" for e in failovers), failovers

    # Restarted, the instance gets traffic again after the next fail_timeout.
    stack.start_instance(2)
    stack.wait_ready(2)
    time.sleep(11)
    mark = len(stack.read_access_log())
    for _ in range(30):
        assert api("GET", "/health/live").status == 200
    assert served_by(stack, 2, since_line=mark) > 0


def test_stopping_an_instance_as_systemd_does_loses_no_request(stack):
    api = Api(stack, stack.https_url)
    status: dict = {}
    outcomes, _ = traffic_around(api, lambda: status.update(code=stack.stop_instance(3)))
    assert status["code"] == 0
    assert len(outcomes) > 100
    assert [o for o in outcomes if o.status != 200] == []
    stack.start_instance(3)
    stack.wait_ready(3)


def requests_counted(stack, number: int) -> float:
    text = call(stack.metrics_url(number)).body.decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "authapp_http_requests_total" and sample.labels["endpoint"] == "/health/live"
    )


def test_recycled_workers_carry_on_their_counters(admin_url, tmp_path):
    """Workers replaced every 6 requests: no request lost from the counts, and the metrics
    directory holds one file per worker and kind, however many processes came and went."""
    recycling = ("--max-requests", "6", "--max-requests-delta", "0", "--min-worker-lifetime", "0")
    with running_stack(admin_url, tmp_path, instances=1, uwsgi_args=recycling) as stack:
        api = Api(stack, stack.https_url)
        for _ in range(40):
            assert api("GET", "/health/live").status == 200
        deadline = time.monotonic() + 30
        while requests_counted(stack, 1) < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert requests_counted(stack, 1) == 40
        messages = stack.instance[1].log.read_text().splitlines()
        assert sum("Respawned uWSGI worker" in m for m in messages) >= 4
        files = sorted(p.name for p in stack.instance[1].metrics_dir.iterdir())
        workers = sum(m.startswith("spawned uWSGI worker") for m in messages)
        assert {name.rsplit("_", 1)[1] for name in files} == {f"w{n}.db" for n in range(1, workers + 1)}, files


def test_a_bad_setting_stops_the_instance(tmp_path):
    """need-app + lazy-apps + wsgi.py's exit status: no endless respawning."""
    log = tmp_path / "uwsgi.log"
    env = {
        "PATH": os.environ["PATH"],
        "ENVIRONMENT": "production",
        "JWT_SECRET_KEY": "k" * 64,
        "BCRYPT_ROUNDS": "many",
        "AUTHAPP_SOCKET": str(tmp_path / "authapp.sock"),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [find_binary("uwsgi"), "--ini", str(UWSGI_INI)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert process.wait(timeout=90) == 22
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    lines = log.read_text().splitlines()
    assert "authapp: configuration error: BCRYPT_ROUNDS must be an integer, got 'many'" in lines
    assert any("need-app requested, destroying the instance" in line for line in lines)
    assert not (tmp_path / "authapp.sock").exists()
