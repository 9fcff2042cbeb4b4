"""The end of a `make test` run names every skipped group, why, and its command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import skips

ROOT = Path(__file__).resolve().parents[1]
PG = "PostgreSQL skipped: TEST_DATABASE_URL not set"


def test_summary_groups_the_reasons_and_gives_each_command():
    reasons = [f"Skipped: {PG}"] * 5 + [
        "end-to-end suite: run it with `make e2e`",
        "fuzz suite: run with --with fuzz (.ci/run does)",
        "the race is shown on PostgreSQL; SQLite serialises writers",
    ]
    lines = skips.summary(reasons, total=12)
    text = "\n".join(lines)
    assert lines[0] == "Skipped 8 of 12 tests, by group (.ci/run runs every group):"
    assert lines[1].split()[:2] == ["PostgreSQL", "5"]
    assert "run: TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres make test" in lines[2]
    assert "run: TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres make e2e" in text
    assert "run: make test PYTEST_ARGS='--with fuzz'" in text
    assert "other          1  the race is shown on PostgreSQL" in text
    assert "browser" not in text and "timing" not in text  # no group that skipped nothing
    assert lines[-1].startswith("More than half of the tests were skipped: each API test is collected once")


def test_no_skips_no_summary_and_no_half_line_under_half():
    assert skips.summary([], total=10) == []
    assert "More than half" not in "\n".join(skips.summary([PG], total=10))


def test_a_real_run_prints_the_groups():
    """pytest on a tiny selection, as `make test` runs it (no TEST_DATABASE_URL, no e2e)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_DATABASE_URL", "AUTHAPP_E2E", "BROWSER_TESTS")}
    selection = [
        "tests/test_docs.py::test_unknown_asset_is_404",
        "tests/e2e/test_deploy_files.py::test_units_nginx_and_uwsgi_agree",
        "tests/test_timing.py",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "Skipped " in out and "by group" in out, out[-3000:]
    for expected in ("PostgreSQL", "make test", "end-to-end", "make e2e", "timing", "--with timing"):
        assert expected in out, expected
