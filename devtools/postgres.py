"""An admin connection to a PostgreSQL server, for creating and dropping databases."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def admin_connection(url: Any) -> Iterator[Any]:
    """An autocommit psycopg2 connection to the server of `url` (a SQLAlchemy URL), for
    CREATE/DROP DATABASE and pg_stat_activity; closed at the end of the block."""
    import psycopg2

    conn = psycopg2.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        dbname=url.database or "postgres",
    )
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()
