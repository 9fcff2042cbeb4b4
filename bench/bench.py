"""`make bench`: requests/s and latency of authapp served as in production (nginx.conf in
front of uWSGI instances from uwsgi.ini, on PostgreSQL), beside two references measured
in the same run on the same machine:

- a bare Flask route returning {} under the same uwsgi.ini and nginx.conf, for the
  endpoints that do no bcrypt work (/health/live, /auth/me, /auth/refresh);
- the bcrypt ceiling, cores / (seconds of one bcrypt check at BCRYPT_ROUNDS), for the
  endpoints that do exactly one bcrypt operation (/auth/login, /auth/register).

Each row is one wrk run (bounded by --seconds), after a short warm-up. Besides the load
averages, each row reports how much of the machine's CPU went to processes that are not
part of the benchmark during that run: figures taken while that share is not near zero
are not a fair measurement. The table is printed, written to docs/benchmark.md (between
the bench markers) and, with every raw figure, to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from devtools.stack import (  # noqa: E402
    PASSWORD,
    Stack,
    admin_connection,
    app_log_entry,
    call,
    create_database,
    drop_database,
)

BENCH = ROOT / "bench"
BARE = "bench.bare:app"
BENCHMARK_PAGE = ROOT / "docs" / "benchmark.md"
START_MARK, END_MARK = "<!-- bench:start -->", "<!-- bench:end -->"
TARGETS = {"/health/live": 0.85, "/auth/me": 0.3, "/auth/login": 0.9, "/auth/register": 0.9}
# Each row against the same row of the commit given by --baseline, in the same run.
BASELINE_TARGETS = {"/auth/me": 1.8, "/auth/refresh": 2.0}
# /auth/me against the FastAPI template's GET /api/v1/users/me, measured in the same run.
PEER_TARGET = 3.0
P99_OVER_P50_LIMIT = 10


# -- CPU accounting --------------------------------------------------------------------------


def cpu_total() -> tuple[int, int]:
    """(busy, all) jiffies of the whole machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def cpu_of(pids: set[int]) -> dict[int, int]:
    """utime + stime (jiffies) of each of these processes that still exists, and of its
    children that exited and were reaped (cutime + cstime): a uWSGI worker recycled
    during a run (max-requests) is counted in its master."""
    times = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        times[pid] = sum(int(value) for value in fields[11:15])
    return times


def kind_of(pid: int) -> str:
    """What a tracked process is, by its command name: "uwsgi", "nginx", "postgres" (the
    stack's PostgreSQL backends) or "other"."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "other"
    return next((kind for kind in CPU_KINDS if name.startswith(kind)), "other")


# The columns of a row's CPU per request, wrk (this process's child) last.
CPU_KINDS = ("uwsgi", "nginx", "postgres")


def cpu_by_kind(before: dict[int, int], after: dict[int, int]) -> dict[str, int]:
    """`cpu_used`, split by `kind_of` each process."""
    split = dict.fromkeys((*CPU_KINDS, "other"), 0)
    for pid, ticks in after.items():
        split[kind_of(pid)] += ticks - before.get(pid, 0)
    return split


def cpu_used(before: dict[int, int], after: dict[int, int]) -> int:
    """CPU used between two samples: a process that appeared counts whole; one that
    exited counts in its parent once reaped (cpu_of)."""
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items())


def group_members(pgids: set[int]) -> set[int]:
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:
            members.add(int(stat.parent.name))
    return members


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- wrk ----------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    path: str
    connections: int
    seconds: float = 0.0  # 0: the runner's --seconds
    result: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    reference_rps: float = 0.0
    others_cpu: float = 0.0
    ours_cpu: float = 0.0
    # CPU microseconds per request of the stack's uWSGI processes, nginx, the PostgreSQL
    # backends and wrk (other tracked processes under "other").
    cpu_per_request: dict[str, float] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""
    peer: str = ""  # the server measured, when it is not this tree's app (see bench/peers.py)

    @property
    def rps(self) -> float:
        return self.result["requests"] / (self.result["duration_us"] / 1e6)

    @property
    def errors(self) -> int:
        keys = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        return sum(self.result[k] for k in keys)

    @property
    def ratio(self) -> float:
        return self.rps / self.reference_rps if self.reference_rps else 0.0


def lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


class Runner:
    def __init__(
        self, seconds: float, warmup: float, tracked_groups: set[int], backends: Callable[[], set[int]]
    ) -> None:
        self.seconds = seconds
        self.warmup = warmup
        self.tracked_groups = tracked_groups
        self.backends = backends  # the stack's PostgreSQL server processes, which come and go

    def wrk(self, url: str, connections: int, seconds: float, script: str, headers: dict[str, str]) -> dict:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", dir=BENCH, delete=False) as handle:
            handle.write(f'BENCH_RUN = "{uuid.uuid4().hex[:6]}"\n{script}\n' + (BENCH / "report.lua").read_text())
        command = ["wrk", "--threads", "1", "--connections", str(connections), "--duration", f"{round(seconds)}s"]
        command += ["--timeout", "20s", "--script", handle.name]
        for name, value in headers.items():
            command += ["--header", f"{name}: {value}"]
        try:
            done = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 60)
        finally:
            os.unlink(handle.name)
        match = re.search(r"^BENCH_RESULT (.*)$", done.stdout, re.M)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return json.loads(match.group(1))

    def measure(
        self, row: Row, url: str, script: str = "", headers: dict[str, str] | None = None, warm: bool = True
    ) -> Row:
        """One wrk run; CPU is split between the benchmark's processes (the stack, its
        PostgreSQL backends, wrk) and everything else on the machine."""
        headers = headers or {}
        row.seconds = row.seconds or self.seconds
        if warm and self.warmup:
            self.wrk(url, row.connections, self.warmup, script, headers)
        self.settle()
        row.load_before = loadavg()
        busy0, all0 = cpu_total()
        ours0 = cpu_of(self.tracked())
        wrk0 = children_cpu()
        row.result = self.wrk(url, row.connections, row.seconds, script, headers)
        wrk1 = children_cpu()
        busy1, all1 = cpu_total()
        ours1 = cpu_of(self.tracked())
        row.load_after = loadavg()
        total = max(all1 - all0, 1)
        row.ours_cpu = (cpu_used(ours0, ours1) + wrk1 - wrk0) / total
        split = {**cpu_by_kind(ours0, ours1), "wrk": wrk1 - wrk0}
        microseconds = 1e6 / os.sysconf("SC_CLK_TCK") / max(row.result["requests"], 1)
        row.cpu_per_request = {kind: ticks * microseconds for kind, ticks in split.items()}
        row.others_cpu = max(0.0, (busy1 - busy0) / total - row.ours_cpu)
        return row

    def tracked(self) -> set[int]:
        return self.backends() | group_members(self.tracked_groups)

    def settle(self, quiet: float = 0.05, interval: float = 0.2, limit: float = 15.0) -> None:
        """Wait until the stack is idle. When wrk stops, the requests it leaves in flight
        are still being served (a login's bcrypt check cannot be interrupted): without
        this wait, that work (up to a second of both cores after a bcrypt row's warm-up)
        would be counted against the next measured run."""
        ticks = interval * os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            pids = self.tracked()
            before = cpu_of(pids)
            time.sleep(interval)
            if cpu_used(before, cpu_of(pids)) <= quiet * ticks:
                return
        print(f"the stack did not settle within {limit:g} s; measuring anyway", file=sys.stderr)


def children_cpu() -> int:
    """CPU of this process's reaped children (the wrk runs), in clock ticks like /proc."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK"))


# -- The bcrypt ceiling ---------------------------------------------------------------------------


def bcrypt_seconds(rounds: int, samples: int) -> list[float]:
    """Seconds of one check as the app does it (authapp.auth.passwords), one at a time."""
    from authapp.auth import passwords

    hashed = passwords.hash_password(PASSWORD, rounds)
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        assert passwords.verify_password(PASSWORD, hashed)
        times.append(time.perf_counter() - started)
    return times


# -- The run --------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    models = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    cpu = models[0].split(":", 1)[1].strip() if models else platform.processor()
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)

    def version(command: list[str], pattern: str) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        found = re.search(pattern, done.stdout + done.stderr)
        return found.group(1) if found else "?"

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": str(memory),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uwsgi": version([str(Path(sys.executable).parent / "uwsgi"), "--version"], r"([\d.]+)"),
        "nginx": version(["nginx", "-v"], r"nginx/([\d.]+)") if _which("nginx") else "?",
        "wrk": version(["wrk", "--version"], r"wrk (\S+)"),
    }


def _which(name: str) -> bool:
    return shutil.which(name) is not None or Path("/usr/sbin", name).exists()


def postgres_backends(admin_url: str, databases: list[str]) -> set[int]:
    from sqlalchemy.engine import make_url

    with admin_connection(make_url(admin_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)", (databases,))
        return {row[0] for row in cur.fetchall()}


def login_pairs(url: str, tls, username: str, count: int) -> list[dict[str, Any]]:
    """`count` sessions of one user (logins in parallel: each is a bcrypt check)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> dict[str, Any]:
        reply = call(url, "POST", "/auth/login", json_body={"username": username, "password": PASSWORD}, tls=tls)
        assert reply.status == 200, reply.body
        return reply.json()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


# The rate limiter runs as in production (Redis counters, shared by every instance), with
# limits the bench's own traffic (every request from 127.0.0.1, every login one account's)
# never reaches: the rows measure the limiter's work, never its refusals.
GENEROUS_LIMIT = "1000000/minute"
LIMITER_ENV = {
    "RATELIMIT_ENABLED": "true",
    "LOGIN_RATE_LIMIT": GENEROUS_LIMIT,
    "REGISTER_RATE_LIMIT": GENEROUS_LIMIT,
    "REFRESH_RATE_LIMIT": GENEROUS_LIMIT,
    "LOGIN_MAX_FAILURES": "10000",
}


def limiter_env(redis_url: str, prefix: str) -> dict[str, str]:
    return {**LIMITER_ENV, "RATELIMIT_STORAGE_URI": redis_url, "RATELIMIT_KEY_PREFIX": prefix}


def drop_counters(redis_url: str, prefix: str) -> int:
    """Delete the bench's counters (its key prefix only: the Redis may be shared); returns
    how many there were."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()


@dataclass
class Step:
    """One wrk run: its row, the server it goes to, what wrk sends, and what the row is
    compared with ("bare": the bare runs just before and after it; "ceiling": the bcrypt
    ceiling; "": nothing, a bare run itself)."""

    row: Row
    base_url: str
    reference: str = ""
    script: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    warm: bool = True


class Plan:
    """The wrk runs of one bench, in order. The bare route runs before and after each row
    compared with it: this machine's speed drifts (seen: the same CPU-bound loop 1.4 to
    2.2 s from one minute to the next), so a row is compared with the bare runs beside it."""

    def __init__(self, bare_url: str, connections: int) -> None:
        self.bare_url, self.connections = bare_url, connections
        self.steps: list[Step] = []

    def bare(self) -> None:
        number = 1 + sum(step.row.path == "/" for step in self.steps)
        self.steps.append(Step(Row(f"bare Flask route ({number})", "/", self.connections), self.bare_url))

    def beside_bare(self, step: Step) -> None:
        if not self.steps or self.steps[-1].reference:
            self.bare()
        step.reference = "bare"
        self.steps.append(step)
        self.bare()

    def against_ceiling(self, step: Step) -> None:
        step.reference = "ceiling"
        self.steps.append(step)

    def measure(self, runner: Runner) -> list[Row]:
        for step in self.steps:
            url = step.base_url + step.row.path
            runner.measure(step.row, url, script=step.script, headers=step.headers, warm=step.warm)
        return [step.row for step in self.steps]

    def compare(self, ceiling: float) -> None:
        """Each row's reference, once every run is measured."""
        for before, step, after in zip([None, *self.steps[:-1]], self.steps, [*self.steps[1:], None], strict=True):
            if step.reference == "ceiling":
                step.row.reference, step.row.reference_rps = "bcrypt ceiling", ceiling
            elif step.reference == "bare":
                assert before is not None and after is not None
                step.row.reference = "bare Flask, runs before and after"
                step.row.reference_rps = statistics.mean((before.row.rps, after.row.rps))


@dataclass
class Server:
    """Something the rows are sent to: its HTTPS base URL, its TLS trust, its name in the
    rows ("" for this tree's app), and what the rows send it."""

    url: str
    tls: Any
    label: str = ""
    access: str = ""  # a Bearer access token
    refresh_tokens: list[str] = field(default_factory=list)


def account(server: Server, sessions: int = 0) -> tuple[str, str]:
    """Register a user of an authapp server; its access token, and (with `sessions`) as many
    refresh tokens, each of its own session (`sessions` + 1 logins: one warms the path up)."""
    user = f"bench{uuid.uuid4().hex[:8]}"
    body = {"email": f"{user}@example.com", "username": user, "password": PASSWORD}
    registered = call(server.url, "POST", "/auth/register", json_body=body, tls=server.tls)
    assert registered.status == 201, registered.body
    server.access = registered.json()["access_token"]
    if sessions:
        pairs = login_pairs(server.url, server.tls, user, sessions + 1)
        chain = pairs.pop()["refresh_token"]
        for _ in range(20):  # wrk cannot warm /auth/refresh up: each token can be used once
            reply = call(server.url, "POST", "/auth/refresh", json_body={"refresh_token": chain}, tls=server.tls)
            assert reply.status == 200, reply.body
            chain = reply.json()["refresh_token"]
        server.refresh_tokens = [pair["refresh_token"] for pair in pairs]
    return user, server.access


def build_plan(args: argparse.Namespace, bare: Server, app: Server, user: str, peers: list[Server]) -> Plan:
    """The rows of the run, by name: authapp's fast rows, each followed by the same row of
    the baseline commit if there is one, and the template's /users/me after /auth/me;
    then the bcrypt rows."""
    fast, slow = args.connections, args.bcrypt_connections or 2 * (os.cpu_count() or 1)
    signed = "" if args.algorithm == "HS256" else f" ({args.algorithm})"
    plan = Plan(bare.url, fast)
    baselines = [peer for peer in peers if peer.label != FASTAPI_LABEL]

    def wanted(path: str) -> bool:
        return not args.only or path in args.only

    def bearer(server: Server) -> dict[str, str]:
        return {"Authorization": f"Bearer {server.access}"}

    repeats = args.repeat
    for number in range(1, repeats + 1):  # the GET rows, `--repeat` times over
        run = f" [run {number}]" if repeats > 1 else ""
        for path, name in (("/health/live", "GET /health/live"), ("/auth/me", f"GET /auth/me{signed}")):
            if not wanted(path):
                continue
            for server in (app, *baselines):
                label = (f" ({server.label})" if server.label else "") + run
                headers = bearer(server) if path == "/auth/me" else {}
                plan.beside_bare(Step(Row(name + label, path, fast, peer=server.label), server.url, headers=headers))
        for server in peers:
            if server.label == FASTAPI_LABEL and wanted("/auth/me"):
                row = Row(f"GET /api/v1/users/me ({FASTAPI_LABEL}){run}", "/api/v1/users/me", fast, peer=server.label)
                plan.beside_bare(Step(row, server.url, headers=bearer(server)))
    for server in (app, *baselines) if wanted("/auth/refresh") else ():
        tokens = lua_string(",".join(server.refresh_tokens))
        script = f"BENCH_TOKENS = {{{tokens}}}\n" + (BENCH / "refresh.lua").read_text()
        row = Row("POST /auth/refresh" + (f" ({server.label})" if server.label else ""), "/auth/refresh", fast)
        row.peer = server.label
        plan.beside_bare(Step(row, server.url, script=script, warm=False))
    if wanted("/auth/login"):
        login = lua_string(json.dumps({"username": user, "password": PASSWORD}))
        script = f"BENCH_BODY = {login}\n" + (BENCH / "post_json.lua").read_text()
        row = Row("POST /auth/login", "/auth/login", slow, args.bcrypt_seconds)
        plan.against_ceiling(Step(row, app.url, script=script))
    if wanted("/auth/register"):
        prefix = lua_string("r" + uuid.uuid4().hex[:6])
        script = f"BENCH_PREFIX = {prefix}\nBENCH_PASSWORD = {lua_string(PASSWORD)}\n"
        script += (BENCH / "register.lua").read_text()
        row = Row("POST /auth/register", "/auth/register", slow, args.bcrypt_seconds)
        plan.against_ceiling(Step(row, app.url, script=script))
    return plan


FASTAPI_LABEL = "full-stack-fastapi-template"
FASTAPI_PEER_NOTE = (
    "the FastAPI full-stack template's backend, `fastapi run --workers 2` (uvicorn), on its own database on the "
    "same PostgreSQL, behind an nginx of its own with nginx.conf's TLS settings (proxy_pass, keep-alive)."
)


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    """The rows, and the references: bcrypt timings, the ceiling, the bare route's mean."""
    tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    databases: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="authapp-bench-"))
    env = {"BCRYPT_ROUNDS": str(args.rounds), "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO")}
    env["JWT_ALGORITHM"] = args.algorithm
    overrides: tuple[str, ...] = ()
    for option in args.uwsgi_option:
        name, _, value = option.partition("=")
        overrides += (f"--{name}", value)
    prefixes: list[str] = []

    def stack(name: str, *uwsgi_args: str, root: Path = ROOT) -> Stack:
        database = f"authapp_bench_{name}_{tag}"
        databases.append(database)
        prefixes.append(f"authapp-bench-{name}-{tag}:")
        return Stack(
            workdir / name,
            create_database(args.database_url, database),
            instances=args.instances,
            env={**env, **limiter_env(args.redis_url, prefixes[-1])},
            nginx_workers=args.nginx_workers,
            uwsgi_args=(*overrides, *uwsgi_args),
            root=root,
        )

    from bench.peers import FastAPIPeer, baseline_tree  # only when the bench runs (tests load this file alone)

    stacks: list[Stack] = []
    fastapi: FastAPIPeer | None = None
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        cleanup.callback(lambda: [drop_database(args.database_url, d) for d in databases])
        cleanup.callback(lambda: [drop_counters(args.redis_url, p) for p in prefixes])
        wanted: list[tuple[str, Path, tuple[str, ...]]] = [("app", ROOT, ()), ("bare", ROOT, ("--module", BARE))]
        baseline = ""
        if args.baseline:
            tree, baseline = cleanup.enter_context(baseline_tree(args.baseline))
            wanted.append(("baseline", tree, ()))
        cleanup.callback(lambda: [st.stop() for st in reversed(stacks)])
        for name, root, uwsgi_args in wanted:
            stacks.append(stack(name, *uwsgi_args, root=root))
            stacks[-1].start()
        app = Server(stacks[0].https_url, stacks[0].tls_context())
        bare = Server(stacks[1].https_url, stacks[1].tls_context())
        peers = []
        if args.baseline:
            label = baseline if baseline.startswith(args.baseline) else f"{args.baseline} at {baseline}"
            peers.append(Server(stacks[2].https_url, stacks[2].tls_context(), label=label))
            account(peers[-1], args.connections + 1)
        if args.peer_fastapi:
            fastapi = FastAPIPeer(args.peer_fastapi, args.peer_fastapi_venv, args.database_url, workdir / "fastapi")
            cleanup.callback(fastapi.stop)
            fastapi.start()
            peers.append(Server(fastapi.https_url, fastapi.tls_context(), FASTAPI_LABEL, fastapi.access_token()))
        # /auth/refresh: one session per wrk connection, plus one for the request wrk makes
        # when a thread starts and never sends.
        user, _ = account(app, args.connections + 1)
        plan = build_plan(args, bare, app, user, peers)

        groups = {i.process.pid for st in stacks for i in st.started if i.process}
        groups |= {st.nginx.pid for st in stacks if st.nginx}
        groups |= fastapi.process_groups() if fastapi else set()
        all_databases = [*databases, *([fastapi.database] if fastapi else [])]
        runner = Runner(args.seconds, args.warmup, groups, lambda: postgres_backends(args.database_url, all_databases))
        bcrypt_times = bcrypt_seconds(args.rounds, args.bcrypt_samples)
        rows = plan.measure(runner)
        bcrypt_times += bcrypt_seconds(args.rounds, args.bcrypt_samples)
        ceiling = (os.cpu_count() or 1) / min(bcrypt_times)
        plan.compare(ceiling)
        return rows, {
            "bcrypt_seconds": bcrypt_times,
            "bare_rps": bare_mean(rows),
            "ceiling": ceiling,
            # A line per request only at INFO (BENCH_LOG_LEVEL=WARNING: none to look for).
            "log_lines_lost": lost_log_lines(stacks[0]) if writes_request_lines(env["LOG_LEVEL"]) else None,
            "baseline": baseline,
            "limiter_prefix": prefixes[0],
            "limiter_keys": drop_counters(args.redis_url, prefixes[0]),  # > 0: the limiter counted
        }
    raise AssertionError("unreachable")


def lost_log_lines(stack: Stack, patience: float = 10.0) -> int:
    """Requests nginx passed to the app whose line (one per request) is not in the app's log.

    nginx logs a request the client gave up on (wrk closing its connections at the end of a
    row, 499) as soon as the client goes, while the worker may still be finishing it (a
    bcrypt hash): such a line lands a moment later. So the logs are read again for up to
    `patience` seconds before a missing line counts as lost; the ones still missing are
    named on standard error."""
    passed = {e["request_id"]: e for e in stack.read_access_log() if e.get("upstream")}
    deadline = time.monotonic() + patience
    while True:
        logged = set()
        for instance in stack.instance.values():
            for line in instance.log.read_text(errors="replace").splitlines():
                entry = app_log_entry(line)
                if entry.get("event") == "request":
                    logged.add(entry.get("request_id"))
        missing = set(passed) - logged
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for request_id in sorted(missing):
        e = passed[request_id]
        print(f"no app log line for {e.get('method')} {e.get('path')} (nginx status {e.get('status')}, "
              f"upstream {e.get('upstream_status')}, request id {request_id})", file=sys.stderr)  # fmt: skip
    return len(missing)


# -- Report ----------------------------------------------------------------------------------------


def bare_mean(rows: list[Row]) -> float | None:
    """The bare route's mean requests/s over its runs; None when only the bcrypt rows ran
    (no bare run is made beside them)."""
    bare = [row.rps for row in rows if row.path == "/"]
    return statistics.mean(bare) if bare else None


def writes_request_lines(level: str) -> bool:
    """Whether the app logs a line per request at LOG_LEVEL `level` (they are INFO)."""
    return level.upper() in ("DEBUG", "INFO")


def runs_of(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """The rows by (path, peer): one run each, or `--repeat` runs of the GET rows."""
    grouped: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        grouped.setdefault((row.path, row.peer), []).append(row)
    return grouped


def mean_ratio(runs: list[Row]) -> float:
    return statistics.mean(row.ratio for row in runs)


def mean_rps(runs: list[Row]) -> float:
    return statistics.mean(row.rps for row in runs)


def of_runs(runs: list[Row]) -> str:
    """ " (mean of 3 runs: 0.80, 0.87, 0.91)" when a row was measured more than once."""
    if len(runs) == 1:
        return ""
    return f" (mean of {len(runs)} runs: {', '.join(f'{row.ratio:.2f}' for row in runs)})"


def verdicts(rows: list[Row]) -> list[tuple[str, bool]]:
    """Each target against the mean of its rows' runs (one run each unless `--repeat`)."""
    found = []
    grouped = runs_of(rows)
    ours = {path: runs for (path, peer), runs in grouped.items() if not peer}
    for path, target in TARGETS.items():
        runs = ours.get(path)
        if runs is None:
            continue
        ratio = mean_ratio(runs)
        text = f"{path}: {ratio:.2f} of {runs[0].reference}{of_runs(runs)} (target >= {target})"
        found.append((text, ratio >= target))
    for (path, peer), runs in grouped.items():
        target = BASELINE_TARGETS.get(path)
        if peer and peer != FASTAPI_LABEL and target is not None and path in ours:
            text = f"{path}: {mean_rps(ours[path]) / mean_rps(runs):.2f} x {peer}{normalized(ours[path], runs)}"
            found.append((f"{text} (target >= {target:g})", mean_rps(ours[path]) >= target * mean_rps(runs)))
    if "/auth/me" not in ours:
        return found
    worst = max(ours["/auth/me"], key=lambda row: row.result["p99_us"] / row.result["p50_us"]).result
    text = f"/auth/me: p99 {worst['p99_us'] / 1000:.1f} ms = {worst['p99_us'] / worst['p50_us']:.1f} x p50"
    if len(ours["/auth/me"]) > 1:
        text += f" (the highest of {len(ours['/auth/me'])} runs)"
    found.append((f"{text} (target < {P99_OVER_P50_LIMIT})", worst["p99_us"] < P99_OVER_P50_LIMIT * worst["p50_us"]))
    for (_path, peer), runs in grouped.items():
        if peer == FASTAPI_LABEL:
            me = ours["/auth/me"]
            text = f"/auth/me: {mean_rps(me) / mean_rps(runs):.2f} x the FastAPI template's GET /api/v1/users/me"
            found.append(
                (
                    f"{text}{normalized(me, runs)} (target >= {PEER_TARGET:g})",
                    mean_rps(me) >= PEER_TARGET * mean_rps(runs),
                )
            )
    return found


def normalized(ours: list[Row], peer: list[Row]) -> str:
    """The same ratio with each row taken against the bare runs beside it (the drift out;
    the mean of the runs' ratios when a row ran more than once)."""
    mine, theirs = mean_ratio(ours), mean_ratio(peer)
    if not (mine and theirs):
        return ""
    return f"; {mine / theirs:.2f} x against the bare runs beside each"


def peer_lines(rows: list[Row]) -> list[str]:
    """Each row of authapp beside the same row of another commit (`--baseline`), where
    no target says more (`BASELINE_TARGETS`: those are verdicts); means of the runs."""
    grouped = runs_of(rows)
    ours = {path: runs for (path, peer), runs in grouped.items() if not peer}
    lines = []
    for (path, peer), runs in grouped.items():
        if peer and peer != FASTAPI_LABEL and path in ours and path not in BASELINE_TARGETS:
            mine, theirs = mean_rps(ours[path]), mean_rps(runs)
            lines.append(f"- {path}: {mine / theirs:.2f} x {peer} ({mine:,.1f} / {theirs:,.1f} "
                         f"requests/s{normalized(ours[path], runs)})")  # fmt: skip
    return lines


def cpu_split(row: Row) -> str:
    """The row's CPU per request by process, in microseconds ("other" added when not 0)."""
    used = row.cpu_per_request
    if not used:
        return ""
    text = " / ".join(f"{used.get(kind, 0.0):,.0f}" for kind in (*CPU_KINDS, "wrk"))
    return text + (f" (+{used['other']:,.0f} other)" if used.get("other") else "")


def table(rows: list[Row], info: dict[str, Any]) -> str:
    lines = [
        "| endpoint | conns | requests/s | p50 ms | p99 ms | reference | ratio | target | load before → after "
        "| others' CPU | CPU µs per request: uWSGI / nginx / PostgreSQL / wrk |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        target = None if row.peer else TARGETS.get(row.path)
        ratio = f"{row.ratio:.2f}" if row.reference_rps else ""
        reference = f"{row.reference} ({row.reference_rps:,.1f}/s)" if row.reference_rps else "(reference)"
        errors = f" ({row.errors} errors)" if row.errors else ""
        lines.append(
            f"| {row.name} | {row.connections} | {row.rps:,.1f}{errors} | {row.result['p50_us'] / 1000:.1f} "
            f"| {row.result['p99_us'] / 1000:.1f} | {reference} | {ratio} | {f'>= {target}' if target else ''} "
            f"| {row.load_before} → {row.load_after} | {row.others_cpu:.0%} | {cpu_split(row)} |"
        )
    m = info["machine"]
    times = info["bcrypt_seconds"]
    limits = ", ".join(f"{k}={v}" for k, v in LIMITER_ENV.items() if k != "RATELIMIT_ENABLED")
    return "\n".join(
        [
            f"Measured {info['when']} with `{info['command']}` on {m['cpu']}, {m['cores']} cores, "
            f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, uWSGI {m['uwsgi']}, "
            f"nginx {m['nginx']}, wrk {m['wrk']}: nginx + {info['instances']} uWSGI instance(s) of uwsgi.ini"
            + (f" with {', '.join(info['uwsgi_options'])}" if info["uwsgi_options"] else "")
            + ", "
            f"PostgreSQL on the same machine, BCRYPT_ROUNDS={info['rounds']}, wrk with 1 thread, "
            f"{info['seconds']:g} s per row ({info['bcrypt_seconds_per_row']:g} s for the bcrypt rows) after "
            f"{info['warmup']:g} s of warm-up and a wait for the stack to be idle. Rate limiter on, its "
            f"counters in Redis, with {limits} "
            "(generous: every request of the bench comes from one address and logs into one account)."
            + (
                f" LOG_LEVEL={info['log_level']}: no request log lines."
                if not writes_request_lines(info.get("log_level", "INFO"))
                else ""
            )
            + (f" Baseline: a second stack from a worktree of {info['baseline']}." if info.get("baseline") else "")
            + (f" Peer: {FASTAPI_PEER_NOTE}" if any(r.peer == FASTAPI_LABEL for r in rows) else ""),
            "",
            *lines,
            "",
            f"bcrypt ceiling: {m['cores']} cores / {min(times) * 1000:.0f} ms (fastest of {len(times)} checks; "
            f"median {statistics.median(times) * 1000:.0f} ms) = {info['ceiling']:.2f} requests/s. "
            + (
                "Bare Flask reference: the mean of the bare runs just before and after each row (all bare "
                f"runs: mean {info['bare_rps']:,.1f} requests/s). "
                if info.get("bare_rps") is not None
                else ""
            )
            + "Request log lines lost: "
            f"{'not checked (LOG_LEVEL above INFO)' if info['log_lines_lost'] is None else info['log_lines_lost']}. "
            '"others\' CPU": the share of '
            "the machine's CPU used by processes outside the benchmark during the row (other users' work); "
            'figures are fair only when it is near 0. "CPU µs per request": the CPU time (user and '
            "system, from /proc) of the uWSGI processes, nginx, the stack's PostgreSQL backends and wrk "
            'during the row, divided by the requests served; "other": the peer\'s own server.',
            "",
            *[f"- {'PASS' if ok else 'MISS'}: {text}" for text, ok in info["verdicts"]],
            *peer_lines(rows),
        ]
    )


def at_least_one(text: str) -> int:
    """--repeat's value: a whole number of runs, 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def bench_command(argv: list[str]) -> str:
    """`make bench` with the options given, the database URL left out."""
    options, skip = [], False
    for arg in argv:
        if skip or arg.startswith(("--database-url", "--results-dir", "--redis-url")):
            skip = arg in ("--database-url", "--results-dir", "--redis-url")
            continue
        options.append(arg)
    return "make bench" + (f" BENCH_ARGS='{' '.join(options)}'" if options else "")


def write_table(text: str, page: Path = BENCHMARK_PAGE) -> None:
    """Replace what stands between the bench markers of `page` with `text`."""
    content = page.read_text()
    if START_MARK not in content or END_MARK not in content:
        raise RuntimeError(f"{page.relative_to(ROOT)} has no {START_MARK} ... {END_MARK} block")
    before, rest = content.split(START_MARK, 1)
    _, after = rest.split(END_MARK, 1)
    page.write_text(f"{before}{START_MARK}\n{text}\n{END_MARK}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="a PostgreSQL role that may create databases")
    parser.add_argument("--seconds", type=int, default=12, help="length of each measured run (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up before each run (default 3)")
    parser.add_argument("--instances", type=int, default=3, help="uWSGI instances behind nginx (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections, no-bcrypt endpoints")
    parser.add_argument(
        "--bcrypt-connections",
        type=int,
        default=0,
        help="wrk connections, bcrypt endpoints (default: 2 per core, enough to keep every core busy)",
    )
    parser.add_argument(
        "--bcrypt-seconds",
        type=int,
        default=30,
        help="length of the bcrypt rows' runs (default 30: the requests in flight when wrk stops, "
        "about half a connection's request each, are work not counted)",
    )
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument(
        "--uwsgi-option",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="override a uwsgi.ini option in both stacks, e.g. threads=1 (repeatable)",
    )
    parser.add_argument("--rounds", type=int, default=12, help="BCRYPT_ROUNDS (default 12, production's)")
    parser.add_argument(
        "--algorithm",
        default="HS256",
        choices=["HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"],
        help="JWT_ALGORITHM of the app (default HS256); e.g. --algorithm EdDSA --only /auth/me",
    )
    parser.add_argument("--bcrypt-samples", type=int, default=5)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATH",
        help="measure only this endpoint (repeatable) beside the bare route; implies --no-write",
    )
    parser.add_argument(
        "--no-write",
        "--no-readme",
        dest="no_write",
        action="store_true",
        help="do not write the table into docs/benchmark.md (--no-readme: the former name)",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="the rate limiter's Redis (its keys get a prefix of their own, deleted afterwards)",
    )
    parser.add_argument(
        "--baseline",
        metavar="GITREF",
        help="also measure the fast rows of this commit (a git worktree of it, a stack of its own)",
    )
    parser.add_argument(
        "--peer-fastapi",
        type=Path,
        metavar="PATH",
        help="a checkout of the FastAPI full-stack template: also measure its GET /api/v1/users/me",
    )
    parser.add_argument(
        "--peer-fastapi-venv",
        type=Path,
        metavar="PATH",
        help="the template's virtualenv (default: PATH/backend/.venv, what `uv sync` makes)",
    )
    parser.add_argument(
        "--repeat",
        type=at_least_one,
        default=1,
        help="measure the GET rows (/health/live, /auth/me and their peers) this many times, each "
        "between bare runs; the targets are checked against the mean (default 1)",
    )
    parser.add_argument("--results-dir", type=Path, default=BENCH / "results", help="where the raw figures go")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.peer_fastapi:  # refused before anything starts
        from bench.peers import template_backend

        args.peer_fastapi_venv = args.peer_fastapi_venv or args.peer_fastapi / "backend" / ".venv"
        template_backend(args.peer_fastapi, args.peer_fastapi_venv)
    # `timeout` (make bench) sends SIGTERM: unwind so that every process started is stopped.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    info: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": bench_command(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "instances": args.instances,
        "uwsgi_options": args.uwsgi_option,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "bcrypt_seconds_per_row": args.bcrypt_seconds,
        "load_start": loadavg(),
        "log_level": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
    }
    rows, references = run(args)
    info.update(references, load_end=loadavg(), verdicts=verdicts(rows))
    text = table(rows, info)
    print(text)
    results = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = {**info, "rows": [{**row.__dict__, "rps": row.rps, "ratio": row.ratio} for row in rows]}
    (results / f"bench-{stamp}.json").write_text(json.dumps(raw, indent=2, default=str))
    (results / f"bench-{stamp}.md").write_text(text + "\n")
    if not (args.no_write or args.only):
        write_table(text)
    if any(row.errors for row in rows):
        print("some requests failed: the figures above are not valid", file=sys.stderr)
        return 2
    if info["log_lines_lost"]:
        print(f"{info['log_lines_lost']} request log lines were lost under load", file=sys.stderr)
        return 2
    return 1 if args.strict and not all(ok for _, ok in info["verdicts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
