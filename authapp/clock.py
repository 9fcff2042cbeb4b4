"""The service's one clock, and the contract's time format (ISO 8601, UTC, milliseconds, Z).

Every module asks `clock.now()` for the time, so a test that freezes or moves this one
function (`monkeypatch.setattr(clock, "now", ...)`) moves the whole service. PyJWT checks
a token's `exp` and `nbf` against the real time on its own.
"""

from datetime import UTC, datetime


def now() -> datetime:
    """The current time, UTC, in whole seconds: JWT times are whole seconds, and a token pair
    is minted again from the stored values (auth.tokens)."""
    return datetime.now(UTC).replace(microsecond=0)


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_now() -> str:
    return iso(datetime.now(UTC))
