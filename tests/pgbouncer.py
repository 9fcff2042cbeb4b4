"""Debian's PgBouncer in transaction mode, with its stock settings (no
`ignore_startup_parameters`), on a free loopback port in front of a PostgreSQL server:
for tests/test_pgbouncer.py, and for `pytest --pgbouncer`, which runs every PostgreSQL
test that takes its database from the suite's fixtures through it.

That run keeps the app's default `DATABASE_IDLE_TIMEOUT`, which the docs say to turn off
behind PgBouncer: its `SET idle_session_timeout` stays on the PgBouncer server connection
it ran on, but every test's database is its own and is dropped after the test, and the
server connections to it with it, so the setting reaches no other client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pgcluster
from helpers import wait_until
from sqlalchemy.engine import make_url

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def available() -> bool:
    return os.path.exists(PGBOUNCER)


@contextmanager
def running(upstream_url: str, pool_size: int = 4) -> Iterator[int]:
    """PgBouncer in front of `upstream_url`'s server, every database name passed through;
    yields its port."""
    upstream = make_url(upstream_url)
    root = Path(tempfile.mkdtemp(prefix="authapp-pgbouncer-"))
    port = pgcluster.free_port()
    (root / "userlist.txt").write_text(f'"{upstream.username or "postgres"}" ""\n')
    (root / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={upstream.host or '127.0.0.1'} port={upstream.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {root / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 200\n"
        f"logfile = {root / 'pgbouncer.log'}\n"
    )
    if os.geteuid() == 0:
        for path in (root, root / "userlist.txt", root / "pgbouncer.ini"):
            shutil.chown(path, pgcluster.SERVER_USER, pgcluster.SERVER_USER)
    process = subprocess.Popen(
        pgcluster.as_server_user([PGBOUNCER, str(root / "pgbouncer.ini")]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _accepts(port) or process.poll() is not None, 10, "pgbouncer to listen")
        assert process.poll() is None, (root / "pgbouncer.log").read_text()
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)


def through(url: str, port: int) -> str:
    """`url` with PgBouncer's address in place of the server's."""
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
