"""Is the database's schema the one this code was written for? The migrations' head
(read once per process from the migrations folder) against the database's
`alembic_version` table: checked once at start-up and by every readiness check."""

from __future__ import annotations

import logging
import threading
from functools import cache
from pathlib import Path
from typing import cast

from flask import Flask
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import database
from .extensions import db

log = logging.getLogger("authapp.schema")

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")
# PostgreSQL: whether the database takes writes and the schema version, one round trip.
_PG_READINESS = text(
    "SELECT current_setting('transaction_read_only') = 'on', ARRAY(SELECT version_num FROM alembic_version)"
)
_VERSIONS = text("SELECT version_num FROM alembic_version")


@cache
def expected_heads(directory: str = MIGRATIONS_DIR) -> frozenset[str]:
    """The revisions `flask db upgrade` leaves a database at."""
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory(directory).get_heads())


def readiness(connection: Connection) -> tuple[bool, frozenset[str]]:
    """(read-only?, the database's schema revisions), in one statement on PostgreSQL.
    A database that was never migrated raises (no alembic_version table)."""
    if connection.dialect.name == "postgresql":
        read_only, versions = connection.execute(_PG_READINESS).one()
        revisions = cast(list[str], versions)  # a PostgreSQL text[] arrives as a list
        return bool(read_only), frozenset(revisions)
    return False, frozenset(connection.execute(_VERSIONS).scalars())


def mismatch(versions: frozenset[str]) -> str | None:
    """Why the schema is not the code's, in one line naming the fix; None when it is."""
    heads = expected_heads()
    if versions == heads:
        return None
    found = ", ".join(sorted(versions)) or "none"
    return (
        f"the database schema is at revision {found}, the code expects {', '.join(sorted(heads))}: "
        f"{database.UPGRADE_HINT}"
    )


def check_once(engine: Engine) -> str | None:
    """Connect once and log an error when the schema is missing or outdated; returns the
    problem (None: up to date, or the database could not be reached: the probe and
    readiness say so)."""
    try:
        with engine.connect() as connection:
            problem = mismatch(readiness(connection)[1])
    except DBAPIError as exc:
        if not database.is_schema_error(exc):
            log.warning(
                "schema not checked at start-up: %s",
                database.describe(exc),
                extra={"event": "schema_check_skipped", "reason": database.describe(exc)},
            )
            return None
        problem = f"the database has no schema: {database.UPGRADE_HINT}"
    if problem is not None:
        log.error(problem, extra={"event": "schema_outdated"})
    return problem


CHECK_THREAD_NAME = "authapp-schema-check"


def check_in_background(app: Flask) -> threading.Thread:
    """`check_once` in a daemon thread: a slow or absent database never delays start-up."""
    with app.app_context():
        engine = db.engine
    thread = threading.Thread(target=check_once, args=(engine,), name=CHECK_THREAD_NAME, daemon=True)
    thread.start()
    return thread
