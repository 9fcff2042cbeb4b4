"""bench/bench.py's plan, without running it: which rows, in which order, against what
(`make bench` itself runs in tests/e2e/test_bench_script.py)."""

from __future__ import annotations

import argparse

import pytest

from bench.bench import BASELINE_TARGETS, FASTAPI_LABEL, PEER_TARGET, Row, Server, build_plan, peer_lines, verdicts

BARE = Server("https://127.0.0.1:1", None)
APP = Server("https://127.0.0.1:2", None, access="ours", refresh_tokens=["t1", "t2"])
MAIN = Server("https://127.0.0.1:3", None, "main at abc1234", access="theirs", refresh_tokens=["m1"])
FASTAPI = Server("https://127.0.0.1:4", None, FASTAPI_LABEL, access="template")


def options(**overrides) -> argparse.Namespace:
    values = {
        "connections": 4,
        "bcrypt_connections": 2,
        "bcrypt_seconds": 30,
        "algorithm": "HS256",
        "only": [],
        "repeat": 1,
    }
    return argparse.Namespace(**{**values, **overrides})


def test_each_fast_row_and_its_peers_stand_between_bare_runs():
    plan = build_plan(options(), BARE, APP, "someone", [MAIN, FASTAPI])
    assert [(step.row.name, step.base_url, step.reference) for step in plan.steps] == [
        ("bare Flask route (1)", BARE.url, ""),
        ("GET /health/live", APP.url, "bare"),
        ("bare Flask route (2)", BARE.url, ""),
        ("GET /health/live (main at abc1234)", MAIN.url, "bare"),
        ("bare Flask route (3)", BARE.url, ""),
        ("GET /auth/me", APP.url, "bare"),
        ("bare Flask route (4)", BARE.url, ""),
        ("GET /auth/me (main at abc1234)", MAIN.url, "bare"),
        ("bare Flask route (5)", BARE.url, ""),
        (f"GET /api/v1/users/me ({FASTAPI_LABEL})", FASTAPI.url, "bare"),
        ("bare Flask route (6)", BARE.url, ""),
        ("POST /auth/refresh", APP.url, "bare"),
        ("bare Flask route (7)", BARE.url, ""),
        ("POST /auth/refresh (main at abc1234)", MAIN.url, "bare"),
        ("bare Flask route (8)", BARE.url, ""),
        ("POST /auth/login", APP.url, "ceiling"),
        ("POST /auth/register", APP.url, "ceiling"),
    ]
    headers = {step.row.name: step.headers for step in plan.steps}
    assert headers["GET /auth/me"] == {"Authorization": "Bearer ours"}
    assert headers["GET /auth/me (main at abc1234)"] == {"Authorization": "Bearer theirs"}
    assert headers[f"GET /api/v1/users/me ({FASTAPI_LABEL})"] == {"Authorization": "Bearer template"}
    ours, theirs = (step for step in plan.steps if step.row.path == "/auth/refresh")
    assert 'BENCH_TOKENS = {"t1,t2"}' in ours.script and not ours.warm
    assert 'BENCH_TOKENS = {"m1"}' in theirs.script and theirs.row.peer == MAIN.label


def test_without_peers_the_plan_is_authapps_rows_alone():
    plan = build_plan(options(only=["/auth/me"]), BARE, APP, "someone", [])
    assert [step.row.name for step in plan.steps] == ["bare Flask route (1)", "GET /auth/me", "bare Flask route (2)"]


def test_the_bcrypt_rows_alone_run_with_no_bare_route_beside_them():
    from bench.bench import bare_mean

    plan = build_plan(options(only=["/auth/login", "/auth/register"]), BARE, APP, "someone", [])
    assert [step.row.name for step in plan.steps] == ["POST /auth/login", "POST /auth/register"]
    assert bare_mean([step.row for step in plan.steps]) is None


def measured(rps: float, reference: float, peer: str = "", path: str = "/auth/me") -> Row:
    row = Row("a row", path, 4, peer=peer, reference="bare", reference_rps=reference)
    row.result = {"requests": rps, "duration_us": 1_000_000, "p50_us": 1000, "p99_us": 2000}
    return row


@pytest.mark.parametrize(("ours", "theirs", "passed"), [(300.0, 100.0, True), (299.0, 100.0, False)])
def test_auth_me_is_held_to_three_times_the_templates_users_me(ours, theirs, passed):
    rows = [measured(ours, 1000.0), measured(theirs, 1000.0, FASTAPI_LABEL, "/api/v1/users/me")]
    (found,) = [(text, ok) for text, ok in verdicts(rows) if "FastAPI template" in text]
    assert found == (
        f"/auth/me: {ours / theirs:.2f} x the FastAPI template's GET /api/v1/users/me; "
        f"{ours / theirs:.2f} x against the bare runs beside each (target >= {PEER_TARGET:g})",
        passed,
    )


def test_a_baseline_row_is_compared_with_this_trees_and_has_no_target_of_its_own():
    rows = [measured(200.0, 1000.0, path="/health/live"), measured(100.0, 500.0, "main at abc1234", "/health/live")]
    assert peer_lines(rows) == [
        "- /health/live: 2.00 x main at abc1234 (200.0 / 100.0 requests/s; 1.00 x against the bare runs beside each)"
    ]
    assert [text for text, _ in verdicts(rows) if "of bare" in text] == ["/health/live: 0.20 of bare (target >= 0.85)"]


@pytest.mark.parametrize(
    ("path", "ours", "passed"),
    [
        ("/auth/me", 180.0, True),
        ("/auth/me", 179.0, False),
        ("/auth/refresh", 200.0, True),
        ("/auth/refresh", 199.0, False),
    ],
)
def test_auth_me_and_refresh_are_held_to_the_baseline(path, ours, passed):
    rows = [measured(ours, 1000.0, path=path), measured(100.0, 1000.0, "main at abc1234", path)]
    target = BASELINE_TARGETS[path]
    (found,) = [(text, ok) for text, ok in verdicts(rows) if "main at abc1234" in text]
    ratio = f"{ours / 100.0:.2f}"
    assert found == (
        f"{path}: {ratio} x main at abc1234; {ratio} x against the bare runs beside each (target >= {target:g})",
        passed,
    )
    assert peer_lines(rows) == []  # the verdict says it


def test_repeat_measures_the_get_rows_again_each_between_bare_runs():
    plan = build_plan(options(only=["/health/live", "/auth/me"], repeat=2), BARE, APP, "someone", [FASTAPI])
    assert [step.row.name for step in plan.steps] == [
        "bare Flask route (1)",
        "GET /health/live [run 1]",
        "bare Flask route (2)",
        "GET /auth/me [run 1]",
        "bare Flask route (3)",
        f"GET /api/v1/users/me ({FASTAPI_LABEL}) [run 1]",
        "bare Flask route (4)",
        "GET /health/live [run 2]",
        "bare Flask route (5)",
        "GET /auth/me [run 2]",
        "bare Flask route (6)",
        f"GET /api/v1/users/me ({FASTAPI_LABEL}) [run 2]",
        "bare Flask route (7)",
    ]


@pytest.mark.parametrize(("second", "passed"), [(900.0, True), (890.0, False)])
def test_a_repeated_row_is_held_to_the_mean_of_its_runs(second, passed):
    rows = [measured(800.0, 1000.0, path="/health/live"), measured(second, 1000.0, path="/health/live")]
    (found,) = [(text, ok) for text, ok in verdicts(rows) if text.startswith("/health/live")]
    mean = (0.8 + second / 1000) / 2
    assert found == (
        f"/health/live: {mean:.2f} of bare (mean of 2 runs: 0.80, {second / 1000:.2f}) (target >= 0.85)",
        passed,
    )


def test_the_template_is_compared_on_the_means_of_the_runs():
    rows = [
        measured(300.0, 1000.0),
        measured(100.0, 1000.0, FASTAPI_LABEL, "/api/v1/users/me"),
        measured(340.0, 1000.0),
        measured(100.0, 1000.0, FASTAPI_LABEL, "/api/v1/users/me"),
    ]
    (found,) = [(text, ok) for text, ok in verdicts(rows) if "FastAPI template" in text]
    assert found[0].startswith("/auth/me: 3.20 x the FastAPI template's") and found[1] is True


def test_the_p99_line_holds_the_worst_of_the_runs():
    calm, tailed = measured(300.0, 1000.0), measured(300.0, 1000.0)
    tailed.result = {**tailed.result, "p99_us": 12_000}  # 12 x its p50 of 1 ms
    (found,) = [(text, ok) for text, ok in verdicts([calm, tailed]) if "p99" in text]
    assert found == ("/auth/me: p99 12.0 ms = 12.0 x p50 (the highest of 2 runs) (target < 10)", False)


@pytest.mark.parametrize(("text", "accepted"), [("1", True), ("3", True), ("0", False), ("-2", False)])
def test_repeat_takes_one_run_or_more(text, accepted):
    from bench.bench import at_least_one

    if accepted:
        assert at_least_one(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            at_least_one(text)


@pytest.mark.parametrize(("level", "lines"), [("INFO", True), ("debug", True), ("WARNING", False), ("ERROR", False)])
def test_the_lost_line_check_runs_only_where_requests_are_logged(level, lines):
    from bench.bench import writes_request_lines

    assert writes_request_lines(level) is lines
