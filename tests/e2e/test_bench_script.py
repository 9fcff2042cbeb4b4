"""bench/bench.py runs end to end (a second per row, so its figures mean nothing here; the
real run is `make bench` on an idle machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import redis

from devtools.stack import ROOT

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def run_bench(admin_url: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "bench" / "bench.py"), "--database-url", admin_url, "--redis-url", REDIS_URL]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600)


# The bare route runs before and after each row compared with it.
ROWS = [
    "bare Flask route (1)",
    "GET /health/live",
    "bare Flask route (2)",
    "GET /auth/me",
    "bare Flask route (3)",
    "POST /auth/refresh",
    "bare Flask route (4)",
    "POST /auth/login",
    "POST /auth/register",
]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_the_benchmark_runs_and_every_request_succeeds(admin_url, tmp_path):
    readme, page = (ROOT / "README.md").read_text(), (ROOT / "docs" / "benchmark.md").read_text()
    quick = ["--seconds", "1", "--warmup", "1", "--instances", "1", "--connections", "4"]
    quick += ["--bcrypt-connections", "2", "--bcrypt-seconds", "1", "--rounds", "4", "--bcrypt-samples", "1"]
    result = run_bench(admin_url, "--no-write", "--results-dir", str(tmp_path), *quick)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (raw,) = tmp_path.glob("bench-*.json")
    figures = json.loads(raw.read_text())
    assert [row["name"] for row in figures["rows"]] == ROWS
    for row in figures["rows"]:
        assert row["result"]["requests"] > 0, row
        errors = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        assert sum(row["result"][key] for key in errors) == 0, row
        assert f"| {row['name']} |" in result.stdout
        assert row["cpu_per_request"]["uwsgi"] > 0 and set(row["cpu_per_request"]) == {
            "uwsgi",
            "nginx",
            "postgres",
            "wrk",
            "other",
        }, row  # the app's processes did the work; each kind has its column
    rows = figures["rows"]
    for i, row in enumerate(rows):
        if row["path"] in ("/health/live", "/auth/me", "/auth/refresh"):
            assert row["reference_rps"] == pytest.approx((rows[i - 1]["rps"] + rows[i + 1]["rps"]) / 2)
        elif row["path"] in ("/auth/login", "/auth/register"):
            assert row["reference_rps"] == figures["ceiling"]
    assert figures["ceiling"] > 0 and figures["bare_rps"] > 0
    assert figures["log_lines_lost"] == 0
    # The rate limiter ran (as in production, on Redis) and counted, with limits no
    # request of the bench reached (every one succeeded); its keys are gone afterwards.
    assert "Rate limiter on" in result.stdout and "REFRESH_RATE_LIMIT=1000000/minute" in result.stdout
    assert figures["limiter_keys"] > 0
    client = redis.Redis.from_url(REDIS_URL)
    assert list(client.scan_iter(match=f"*{figures['limiter_prefix']}*")) == []
    client.close()
    # No peer was asked for: no peer row, no peer line.
    assert not any(row["peer"] for row in figures["rows"])
    assert not [line for line in result.stdout.splitlines() if line.startswith("- /")]  # the peer lines
    assert (ROOT / "README.md").read_text() == readme
    assert (ROOT / "docs" / "benchmark.md").read_text() == page


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_the_benchmark_measures_a_key_pair_algorithm(admin_url, tmp_path):
    # `make bench BENCH_ARGS="--algorithm EdDSA --only /auth/me"`: a first key is made at
    # the release step (Stack.migrate), and the row is named after the algorithm.
    quick = ["--seconds", "1", "--warmup", "1", "--instances", "1", "--connections", "4", "--rounds", "4"]
    quick += ["--bcrypt-samples", "1", "--algorithm", "EdDSA", "--only", "/auth/me"]
    result = run_bench(admin_url, "--results-dir", str(tmp_path), *quick)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (raw,) = tmp_path.glob("bench-*.json")
    rows = json.loads(raw.read_text())["rows"]
    assert [row["name"] for row in rows] == ["bare Flask route (1)", "GET /auth/me (EdDSA)", "bare Flask route (2)"]
    assert all(row["result"]["requests"] > 0 and row["result"]["status_errors"] == 0 for row in rows)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_the_benchmark_measures_a_baseline_commit_beside_this_tree(admin_url, tmp_path):
    # `--baseline GITREF`: a second stack from a git worktree of that commit, its row right
    # after this tree's, each between bare runs; the worktree is removed afterwards.
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    quick = ["--seconds", "1", "--warmup", "1", "--instances", "1", "--connections", "4", "--rounds", "4"]
    quick += ["--bcrypt-samples", "1", "--only", "/health/live", "--baseline", "HEAD"]
    result = run_bench(admin_url, "--results-dir", str(tmp_path), *quick)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (raw,) = tmp_path.glob("bench-*.json")
    figures = json.loads(raw.read_text())
    main = f"HEAD at {commit.stdout.strip()}"
    assert [row["name"] for row in figures["rows"]] == [
        "bare Flask route (1)",
        "GET /health/live",
        "bare Flask route (2)",
        f"GET /health/live ({main})",
        "bare Flask route (3)",
    ]
    assert all(row["result"]["requests"] > 0 and row["result"]["status_errors"] == 0 for row in figures["rows"])
    assert "- /health/live: " in result.stdout and f" x {main} (" in result.stdout
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "authapp-baseline-" not in worktrees


def test_a_peer_checkout_that_is_not_the_template_is_refused_before_anything_starts(admin_url, tmp_path):
    result = run_bench(admin_url, "--results-dir", str(tmp_path), "--peer-fastapi", str(tmp_path))
    assert result.returncode != 0
    assert "no backend/app/main.py" in result.stderr
    assert list(tmp_path.glob("bench-*.json")) == []
