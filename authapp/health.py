"""Liveness (the process answers) and readiness (the database answers)."""

from __future__ import annotations

from sqlalchemy import text

from .clock import iso_now
from .database import breaker, unit_of_work
from .errors import AppError
from .openapi import Blueprint, version
from .schemas import HealthSchema, LivenessSchema
from .version import __version__

blp = Blueprint("health", __name__, url_prefix="/health", description="Health checks")


@blp.get("")
@blp.response(200, HealthSchema)
@blp.alt_response(
    503,
    schema=HealthSchema,
    description="unhealthy: the database cannot be reached",
    example={
        "status": "unhealthy",
        "timestamp": "2024-01-15T10:30:45.123Z",
        "version": __version__,
        "checks": {"database": "error", "circuit_breaker": "open"},
    },
)
@blp.alt_response(500, response="INTERNAL_SERVER_ERROR")
def health():
    """Readiness: 200 when the database answers, 503 when it does not."""
    try:
        with unit_of_work() as session:
            session.execute(text("SELECT 1"))
        database = "ok"
    except AppError:
        database = "error"
    body = {
        "status": "healthy" if database == "ok" else "unhealthy",
        "timestamp": iso_now(),
        "version": version(),
        "checks": {"database": database, "circuit_breaker": breaker().state.value},
    }
    return body, 200 if database == "ok" else 503


@blp.get("/live")
@blp.response(200, LivenessSchema)
@blp.alt_response(500, response="INTERNAL_SERVER_ERROR")
def live():
    """Liveness: the process answers; the database is not touched."""
    return {"status": "alive", "timestamp": iso_now()}
