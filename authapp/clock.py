"""The service's one clock, and the contract's time format (ISO 8601, UTC, milliseconds, Z).

Every module asks `clock.now()` for the time, so a test that freezes or moves this one
function (`monkeypatch.setattr(clock, "now", ...)`) moves the whole service. PyJWT checks
a token's `exp` and `nbf` against the real time on its own.
"""

from datetime import UTC, datetime


def now() -> datetime:
    """The current time, UTC, to the millisecond, as the API shows it and both databases
    store it. JWT times are whole seconds taken from these values (auth.tokens: int of the
    timestamp), so a pair minted again from a stored row is the same, byte for byte."""
    current = datetime.now(UTC)
    return current.replace(microsecond=current.microsecond // 1000 * 1000)


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_now() -> str:
    return iso(datetime.now(UTC))
