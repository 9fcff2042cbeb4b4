"""The end of a `make test` run names every skipped group, why, and its command."""

from __future__ import annotations

import ast
import os
import re
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
    assert "PG only        1  SQLite copies of PostgreSQL-only tests" in text  # the race is shown on PostgreSQL
    assert "other" not in text
    assert "browser" not in text and "timing" not in text  # no group that skipped nothing
    assert lines[-1].startswith("More than half of the tests were skipped: each API test is collected once")


def test_the_suites_skip_reasons_without_a_command_have_a_group_with_one():
    """The reasons that name no command of their own (the heavier suites' and the
    PostgreSQL-only tests'), as the suite gives them, each in a group with its command."""
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    heavy = ast.literal_eval(re.search(r"^HEAVY_MARKERS = (\(.*\))$", conftest, re.M).group(1))
    template = re.search(r'reason=f"(\{marker\} suite: [^"]*)"', conftest).group(1)
    expected = {template.replace("{marker}", marker): f"make test PYTEST_ARGS='--with {marker}'" for marker in heavy}
    sources = "".join(path.read_text() for path in (ROOT / "tests").rglob("*.py"))
    for reason in ("parallel refreshes are shown against PostgreSQL",
                   "the race is shown on PostgreSQL; SQLite serialises writers"):  # fmt: skip
        expected[reason] = "TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres make test"
    expected["needs PostgreSQL's initdb (postgresql-15)"] = "apt-get install postgresql-15"
    assert "race" in heavy
    for reason, command in expected.items():
        assert reason in sources or reason.endswith("(.ci/run does)"), f"no test skips with {reason!r} any more"
        lines = skips.summary([reason], total=10)
        assert len(lines) == 3 and lines[1].split()[0] != "other", lines
        assert lines[2].split("run: ", 1)[1].startswith(command), lines


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
