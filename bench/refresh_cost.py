"""What one POST /auth/refresh costs the app, counted rather than timed: the SQL statements
and the round trips to PostgreSQL (each statement, BEGIN and COMMIT), and with --profile
the functions cProfile finds heaviest, with --instructions callgrind's instructions.

The app (wsgi.create_app, on a PostgreSQL database of its own, migrated, the rate limiter
off) is called in-process through its test client: one account, one session, and a chain
of refreshes, each with the token the previous one returned. With --limiter URI the rate
limiter is on, its counters in URI (redis://... as in production), REFRESH_RATE_LIMIT
high enough for the chain: what the limiter's check adds to a refresh.

    .venv/bin/python bench/refresh_cost.py [--refreshes 200] [--profile] [--instructions] [--limiter URI]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

PASSWORD = "correct horse battery staple 9"
WARMUP = 20


def chain(refreshes: int, profile: bool) -> dict[str, float]:
    """Inside the app's environment: `refreshes` refreshes after WARMUP; per refresh, the
    statements, BEGINs and COMMITs seen by the engine."""
    from sqlalchemy import event

    import wsgi
    from authapp.extensions import db

    client = wsgi.app.test_client()
    name = f"counted{uuid.uuid4().hex[:8]}"  # each run (three on one database) an account of its own
    account = {"email": f"{name}@example.com", "username": name, "password": PASSWORD}
    reply = client.post("/auth/register", json=account)
    assert reply.status_code == 201, reply.get_json()
    token = reply.get_json()["refresh_token"]
    seen = {"statements": 0, "begins": 0, "commits": 0}
    statements: list[str] = []

    def one() -> None:
        nonlocal token
        reply = client.post("/auth/refresh", json={"refresh_token": token})
        assert reply.status_code == 200, reply.get_json()
        token = reply.get_json()["refresh_token"]

    for _ in range(WARMUP):
        one()
    with wsgi.app.app_context():
        engine = db.engine

    def on_statement(conn, cursor, statement, *_):
        seen["statements"] += 1
        statements.append(statement.split()[0] + " " + " ".join(statement.split()[1:4]))

    listeners = [
        (engine, "before_cursor_execute", on_statement),
        (engine, "begin", lambda conn: seen.__setitem__("begins", seen["begins"] + 1)),
        (engine, "commit", lambda conn: seen.__setitem__("commits", seen["commits"] + 1)),
    ]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    waits = count_round_trips()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    for _ in range(refreshes):
        one()
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats(os.environ.get("PROFILE_SORT", "cumulative")).print_stats(
            int(os.environ.get("PROFILE_LINES", "35"))
        )
    for target, name, listener in listeners:
        event.remove(target, name, listener)
    seen["round_trips"] = waits()
    print("statements of the last refresh:", *statements[-seen["statements"] // max(refreshes, 1) :], sep="\n  ")
    return {key: value / max(refreshes, 1) for key, value in seen.items()}


def count_round_trips():
    """Count the waits for PostgreSQL from now on (one per round trip: every statement,
    BEGIN and COMMIT go through psycopg2's wait callback, authapp.database's); returns a
    function that stops counting and says how many."""
    import psycopg2.extensions as pg

    callback = pg.get_wait_callback()
    count = 0

    def counting(conn, *args):
        nonlocal count
        count += 1
        return callback(conn, *args)

    pg.set_wait_callback(counting)

    def stop() -> int:
        pg.set_wait_callback(callback)
        return count

    return stop


def environment(admin_url: str, name: str, limiter: str | None = None) -> dict[str, str]:
    from devtools.stack import create_database

    limits = {"RATELIMIT_ENABLED": "false"}
    if limiter:
        # Counters of this run's own (a prefix of its database's name), never reached.
        limits = {"RATELIMIT_STORAGE_URI": limiter, "RATELIMIT_KEY_PREFIX": name, "REFRESH_RATE_LIMIT": "1000000/hour"}
    env = {
        **os.environ,
        "ENVIRONMENT": "production",
        "JWT_SECRET_KEY": "i" * 64,
        **limits,
        "LOG_LEVEL": "INFO",
        "BCRYPT_ROUNDS": "4",
        "PYTHONHASHSEED": "0",
        "MAIL_URL": "smtp://127.0.0.1:1",  # production requires one; a refresh sends nothing
        "MAIL_FROM": "authapp <no-reply@example.com>",
        "FRONTEND_URL": "https://app.example.com",
        "DATABASE_URL": create_database(admin_url, name),
    }
    flask = [str(Path(sys.executable).parent / "flask"), "--app", "wsgi"]
    subprocess.run([*flask, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    return env


def instructions(refreshes: int, env: dict[str, str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable, __file__]
        done = subprocess.run([*command, "--child", "--refreshes", str(refreshes)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
    found = re.search(r"Collected : (\d+)", done.stderr) or re.search(r"refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="print cProfile's heaviest functions")
    parser.add_argument("--instructions", action="store_true", help="callgrind's instructions per refresh")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
    )
    parser.add_argument("--limiter", metavar="URI", help="the rate limiter on, its counters in URI (redis://...)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(chain(args.refreshes, args.profile), flush=True)
        return 0
    from devtools.stack import drop_database

    name = f"authapp_refresh_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        env = environment(args.database_url, name, args.limiter)
        command = [sys.executable, __file__, "--child", "--refreshes", str(args.refreshes)]
        subprocess.run([*command, *(["--profile"] if args.profile else [])], cwd=ROOT, env=env, check=True)
        if args.instructions:
            per = (instructions(args.refreshes, env) - instructions(0, env)) / args.refreshes
            print(f"/auth/refresh: {per:,.0f} instructions per refresh")
    finally:
        drop_database(args.database_url, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
