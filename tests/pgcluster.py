"""PostgreSQL clusters of a test's own, that the test may restart, stop or reconfigure
(never the shared server): Debian's initdb and pg_ctl on a free loopback port.

initdb refuses to run as root, so as root every server command runs as the `postgres`
user (runuser); the data directory lives in a fresh folder under /tmp that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"


def available() -> bool:
    return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or _has_user(SERVER_USER))


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(command: list[str]) -> list[str]:
    """`command` as the non-root user the server runs as (unchanged when not root)."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SERVER_USER, "--", *command]


class PgCluster:
    """A cluster in its own folder on a free port; `settings` go to postgresql.conf."""

    def __init__(self, **settings: str | int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="authapp-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",  # a throwaway cluster: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": 40,
            "shared_buffers": "'16MB'",
            **settings,
        }
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
        self._run(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            for name, value in self.settings.items():
                conf.write(f"{name} = {value}\n")

    def _run(self, command: list[str], timeout: float = 120) -> None:
        subprocess.run(as_server_user(command), check=True, capture_output=True, timeout=timeout)

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        log = self.root / "server.log"
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-t", "30", *args], timeout)

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self.pg_ctl("restart", "-m", mode)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    @contextmanager
    def admin(self, database: str = "postgres") -> Iterator[psycopg2.extensions.connection]:
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database)
        conn.autocommit = True
        try:
            yield conn
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        with self.admin() as conn, conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def accepts(self) -> bool:
        try:
            with self.admin():
                return True
        except psycopg2.OperationalError:
            return False

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def pg_cluster(**settings: str | int) -> Iterator[PgCluster]:
    """A started cluster, stopped and removed at the end of the block."""
    cluster = PgCluster(**settings)
    try:
        cluster.start()
        deadline = time.monotonic() + 30
        while not cluster.accepts():
            if time.monotonic() > deadline:
                raise RuntimeError((cluster.root / "server.log").read_text()[-2000:])
            time.sleep(0.05)
        yield cluster
    finally:
        cluster.destroy()


def create_empty_database(server_url: str, name: str) -> str:
    """A new, empty database on the server of `server_url` (the shared test server); its URL."""
    from sqlalchemy.engine import make_url

    from devtools.postgres import admin_connection

    with admin_connection(make_url(server_url)) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    return (
        make_url(server_url).set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)
    )


def drop_database(server_url: str, name: str) -> None:
    from sqlalchemy.engine import make_url

    from devtools.postgres import admin_connection

    with admin_connection(make_url(server_url)) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
