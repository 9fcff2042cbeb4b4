"""What `make test` says about the tests it skipped: each group, why, and the command that
runs it (tests/conftest.py prints it at the end of every run)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Group:
    name: str
    markers: tuple[str, ...]  # a skip reason containing one of these belongs to the group
    why: str
    command: str


GROUPS = [
    Group("PostgreSQL", ("TEST_DATABASE_URL",),
          "every API test runs on SQLite and on PostgreSQL; set TEST_DATABASE_URL",
          f"TEST_DATABASE_URL={PG_URL} make test"),
    # The SQLite copy of a test that shows a PostgreSQL behaviour skips on every run.
    Group("PG only", ("shown against PostgreSQL", "shown on PostgreSQL"),
          "SQLite copies of PostgreSQL-only tests, always skipped; their PostgreSQL copies need TEST_DATABASE_URL",
          f"TEST_DATABASE_URL={PG_URL} make test"),
    Group("Redis", ("TEST_REDIS_URL",), "the shared rate-limit counters need a Redis; set TEST_REDIS_URL",
          f"TEST_REDIS_URL={REDIS_URL} make test"),
    Group("drills", ("PostgreSQL's initdb",),
          "PostgreSQL outages on clusters of the tests' own (Debian's initdb and pg_ctl)",
          "apt-get install postgresql-15 (initdb, pg_ctl), then make test"),
    Group("browser", ("browser suite",), "headless chromium drives the example frontend and the docs pages",
          "make browser"),
    Group("end-to-end", ("end-to-end suite",), "nginx, uWSGI and deploy/install.sh on PostgreSQL",
          f"TEST_DATABASE_URL={PG_URL} make e2e"),
    Group("promtool", ("promtool",), "the alert rules and dashboard queries, checked by Prometheus' promtool",
          "install promtool (.ci/run unpacks it from Debian's prometheus package), then make test"),
    Group("timing", ("timing suite",), "login timing at the production bcrypt cost (slow)",
          "make test PYTEST_ARGS='--with timing'"),
    Group("fuzz", ("fuzz suite",), "schemathesis and hypothesis fuzzing (slow)",
          "make test PYTEST_ARGS='--with fuzz'"),
    Group("race", ("race suite",), "real servers and threads racing at a production-like bcrypt cost (slow)",
          "make test PYTEST_ARGS='--with race'"),
]  # fmt: skip


def summary(reasons: Iterable[str], total: int) -> list[str]:
    """Lines for the end of a run: the skipped tests by group, each with its command."""
    reasons = [r.removeprefix("Skipped: ") for r in reasons]
    if not reasons:
        return []
    counts: Counter[Group | str] = Counter()
    for reason in reasons:
        group = next((g for g in GROUPS if any(marker in reason for marker in g.markers)), None)
        counts[group or reason] += 1
    lines = [f"Skipped {len(reasons)} of {total} tests, by group (.ci/run runs every group):"]
    for group in GROUPS:
        if counts[group]:
            lines.append(f"  {group.name:<11} {counts[group]:>4}  {group.why}")
            lines.append(f"  {'':<11} {'':>4}  run: {group.command}")
    for reason, count in sorted(((r, c) for r, c in counts.items() if isinstance(r, str)), key=lambda rc: -rc[1]):
        lines.append(f"  {'other':<11} {count:>4}  {reason}")
    if 2 * len(reasons) > total:
        why = "the slower suites run only when asked"
        if counts[GROUPS[0]]:
            why = "each API test is collected once per database and the PostgreSQL half needs TEST_DATABASE_URL; " + why
        lines.append(f"More than half of the tests were skipped: {why}.")
    return lines
