"""Instructions per request of the app itself, counted by valgrind's callgrind.

`make bench` measures the whole stack in requests/s, and on a machine whose speed drifts
(this one: the same CPU-bound loop took 1.4 to 2.2 s from one minute to the next) those
figures move by tens of percent from run to run. Instructions do not: callgrind counts
the same total for the same code and inputs whatever else the machine is doing. So the
effect of a change to the app's per-request work is measured here, and its effect on
requests/s by `make bench`.

For each path the app (wsgi.create_app, on a PostgreSQL database of its own, migrated)
is called in-process through its WSGI interface: 50 requests to warm up, then N more.
Two runs under callgrind, with N=0 and N=--requests; the difference divided by N is the
app's cost of one request, the PostgreSQL server's work excluded. "/" is the bare Flask
route of bench/bare.py, the reference of `make bench`. /auth/me is one account's token
checked again and again; /auth/login is one account's username and password sent again and
again (its per-address limit raised out of the way, its check still made), so past the
warm-up every counted login is at the account's session cap, with bcrypt at 4 rounds
(BCRYPT_ROUNDS=4), where production's 12 rounds cost 256 times that hash's work.

The app runs as in production: the per-address limits on, their counters in Redis
(--redis-url, under a key prefix of this run's own; the keys it made are deleted
afterwards), the metrics in prometheus_client's multiprocess mode (files in a directory
of the run's own). The garbage collector is kept out of the counted requests (collected once
before them, disabled during them, and the process ends without a final collection), and
the start-up's background schema check is waited for before the first request, so that
runs of the same code one right after the other agree closely (three within 1k per
request); runs started from another directory or environment can differ by some 30k
(docs/benchmark.md), so compare a change with its base counted beside it.

    .venv/bin/python bench/instructions.py [--requests 400] [--algorithm EdDSA] [--redis-url URL]
        [--log-level WARNING] [PATH ...]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

WARMUP = 50
LOGIN = "/auth/login"
PASSWORD = "correct horse battery staple 9"


def child(path: str, requests: int) -> None:
    """Inside valgrind: build the app, get a token, call `path` WARMUP + `requests` times."""
    import threading

    from werkzeug.test import EnvironBuilder

    import wsgi
    from authapp.extensions import db
    from authapp.schema_version import CHECK_THREAD_NAME
    from bench.bare import app as bare

    # The start-up's schema check runs on a thread of its own (some million instructions);
    # waited for here, so that none of its work falls among the counted requests.
    for thread in threading.enumerate():
        if thread.name == CHECK_THREAD_NAME:
            thread.join()

    app = bare if path == "/" else wsgi.app
    headers = {}
    body = b""
    if path in ("/auth/me", LOGIN):
        client = wsgi.app.test_client()
        account = {"email": "counted@example.com", "username": "counted", "password": PASSWORD}
        reply = client.post("/auth/register", json=account)
        assert reply.status_code == 201, reply.get_json()
        headers["Authorization"] = f"Bearer {reply.get_json()['access_token']}"
    if path == LOGIN:  # the same account, again and again: past the warm-up, at its session cap
        del headers["Authorization"]
        body = json.dumps({"username": "counted", "password": PASSWORD}).encode()
    builder = EnvironBuilder(
        path=path,
        method="POST" if body else "GET",
        headers=headers,
        data=body or None,
        content_type="application/json" if body else None,
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    environ = builder.get_environ()

    def start_response(status: str, *_: object) -> None:
        assert status.startswith("200"), status

    def call() -> None:
        fresh = dict(environ)
        if body:
            fresh["wsgi.input"] = io.BytesIO(body)  # each request reads its own body
        for _chunk in app(fresh, start_response):
            pass

    for _ in range(WARMUP):
        call()
    gc.collect()
    gc.disable()  # no collection among the counted requests: repeats agree
    for _ in range(requests):
        call()
    with wsgi.app.app_context():
        db.engine.dispose()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no final collection at exit either (it would grow with `requests`)


def count(path: str, requests: int, env: dict[str, str], admin_url: str) -> int:
    """Instructions of one child run (callgrind's total), on a database of its own and
    under a Redis key prefix of its own."""
    from devtools.stack import create_database, drop_database

    name = f"authapp_instr_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    env = {**env, "DATABASE_URL": create_database(admin_url, name), "RATELIMIT_KEY_PREFIX": name}
    try:
        flask = [str(Path(sys.executable).parent / "flask"), "--app", "wsgi"]
        subprocess.run([*flask, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
        if not env["JWT_ALGORITHM"].startswith("HS"):  # a key pair algorithm: a first signing key
            generate = [*flask, "keys", "generate", "--activate"]
            subprocess.run(generate, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
        with tempfile.TemporaryDirectory() as tmp:
            # The metrics as under uWSGI: prometheus_client's multiprocess mode, its files here.
            env["PROMETHEUS_MULTIPROC_DIR"] = tmp
            done = subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={tmp}/callgrind.out",
                    sys.executable,
                    __file__,
                    "--child",
                    "--requests",
                    str(requests),
                    path,
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
    finally:
        drop_database(admin_url, name)
        delete_redis_keys(env["RATELIMIT_STORAGE_URI"], name)
    found = re.search(r"Collected : (\d+)", done.stderr) or re.search(r"refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return int(found.group(1).replace(",", ""))


def delete_redis_keys(url: str, prefix: str) -> None:
    """Delete the rate-limit counters a run made (every key naming its prefix), no others."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["/", "/health/live", "/auth/me"])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--algorithm", default="HS256", help="JWT_ALGORITHM (default HS256; RS256, ES256, EdDSA...)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL role that may create databases",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="the Redis of the per-address limits (keys under a prefix of this run's own)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="LOG_LEVEL of the app (default INFO, production's: a line per request; WARNING: none)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.paths[0], args.requests)
        return 0
    env = {
        **os.environ,
        "ENVIRONMENT": "production",
        "JWT_SECRET_KEY": "i" * 64,
        "RATELIMIT_ENABLED": "true",
        "RATELIMIT_STORAGE_URI": args.redis_url,
        "LOG_LEVEL": args.log_level,
        "BCRYPT_ROUNDS": "4",
        # /auth/login: every request comes from one address; its limit's check runs all the same.
        "LOGIN_RATE_LIMIT": "1000000/minute",
        # Production requires mail settings; no message is sent here (the outbox keeps them).
        "MAIL_URL": "smtp://127.0.0.1:2525",
        "MAIL_FROM": "authapp <no-reply@example.com>",
        "FRONTEND_URL": "https://app.example.com",
        "PYTHONHASHSEED": "0",  # the same dict and set orders in both runs
        "JWT_ALGORITHM": args.algorithm,
    }
    for path in args.paths:
        counted = count(path, args.requests, env, args.database_url)
        baseline = count(path, 0, env, args.database_url)
        per_request = (counted - baseline) / args.requests
        print(f"{path} ({args.algorithm}): {per_request:,.0f} instructions per request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
