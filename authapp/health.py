"""Liveness (the process answers) and readiness (the database answers, takes writes,
and has the schema this code expects)."""

from __future__ import annotations

import logging

from . import schema_version
from .breaker import State
from .clock import iso_now
from .database import UPGRADE_HINT, DatabaseReadOnly, SchemaOutdated, breaker, probe, unit_of_work
from .errors import AppError
from .lograte import ThrottledLog
from .openapi import Blueprint, version
from .schemas import HealthSchema, LivenessSchema
from .speedups import json_response
from .version import __version__

log = ThrottledLog(logging.getLogger("authapp.health"))
# checks.database: "ok"; "error" (unreachable, or the breaker is open); "read_only" (it
# answers but refuses writes); "schema_outdated" (run `flask db upgrade`).
DATABASE_STATES = ("ok", "error", "read_only", "schema_outdated")

blp = Blueprint("health", __name__, url_prefix="/health", description="Health checks")


@blp.get("")
@blp.response(200, HealthSchema)
@blp.alt_response(
    503,
    schema=HealthSchema,
    description="unhealthy: the database cannot be reached, refuses writes, or has an older schema",
    example={
        "status": "unhealthy",
        "timestamp": "2024-01-15T10:30:45.123Z",
        "version": __version__,
        "checks": {"database": "error", "circuit_breaker": "open"},
    },
)
@blp.alt_response(500, response="INTERNAL_SERVER_ERROR")
def health():
    """Readiness: 200 when the database answers, takes writes and has the code's schema;
    503 when not. While the breaker is open the database is not touched: the background
    probe's view (authapp.probe) is the answer."""
    database = _check_database()
    body = {
        "status": "healthy" if database == "ok" else "unhealthy",
        "timestamp": iso_now(),
        "version": version(),
        "checks": {"database": database, "circuit_breaker": breaker().state.value},
    }
    return body, 200 if database == "ok" else 503


@blp.get("/live")
@blp.written_response(200, LivenessSchema)
@blp.alt_response(500, response="INTERNAL_SERVER_ERROR")
def live():
    """Liveness: the process answers; the database is not touched."""
    return json_response({"status": "alive", "timestamp": iso_now()})  # LivenessSchema's dump: two strings


def _check_database() -> str:
    problem: str | None
    try:
        with unit_of_work() as session:
            read_only, versions = schema_version.readiness(session.connection())
    except SchemaOutdated:
        problem = f"the database has no schema: {UPGRADE_HINT}"
    except AppError:
        # While the breaker is open the database is not asked: what the background probe
        # last saw says whether it is down or up but refusing writes.
        if breaker().state is State.OPEN and probe().last_failure is DatabaseReadOnly:
            return "read_only"
        return "error"
    else:
        if read_only:
            return "read_only"
        problem = schema_version.mismatch(versions)
        if problem is None:
            return "ok"
    log.log(logging.ERROR, "schema_outdated", "readiness: %s", problem)
    return "schema_outdated"
