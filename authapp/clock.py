"""The service's one clock, and the contract's time format (ISO 8601, UTC, milliseconds, Z).

Every wall-clock read of the service goes through `clock.now()` (tests/test_layering.py
checks it), so a test that freezes or moves this one function
(`monkeypatch.setattr(clock, "now", ...)`) moves the whole service: stored times, key
ages, the error envelope's and health's timestamps. Durations and timeouts use
`time.monotonic()`, which no one sets. The real time is read on purpose in three places,
each named in that test: PyJWT's `exp` and `nbf` checks and the `verified_tokens`
speed-up that stands in for them, a log record's time (as logging takes it), and the
rate limiter's `Retry-After` (Flask-Limiter's reset times are on the real clock).
"""

from datetime import UTC, datetime, timedelta

# What to take off a time to keep its whole milliseconds: with this subtraction `now()`
# costs a third of what it does with `replace(microsecond=...)`, and `iso_now` (every
# GET /health/live) calls it.
_SUB_MILLISECOND = tuple(timedelta(microseconds=micro) for micro in range(1000))


def now() -> datetime:
    """The current time, UTC, to the millisecond, as the API shows it and both databases
    store it. JWT times are whole seconds taken from these values (auth.tokens: int of the
    timestamp), so a pair minted again from a stored row is the same, byte for byte."""
    current = datetime.now(UTC)
    return current - _SUB_MILLISECOND[current.microsecond % 1000]


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# `iso_now`'s parts: the text up to the second, kept for the second it was made in (one
# tuple, replaced whole, so a thread never sees a key with another second's text), and the
# thousand endings ".000Z" to ".999Z".
_second_text: tuple[tuple[int, ...], str] = ((), "")
_MILLISECOND_TEXT = tuple(f".{milli:03d}Z" for milli in range(1000))


def iso_now() -> str:
    """`now()` in the contract's format: the error envelope's and health's timestamps
    (every GET /health/live). The same text as `iso(now())`, in a third of its time: the
    part up to the second is written once a second, the milliseconds taken from a table.
    It reads the time through `now()`, so a test that sets the clock sets this too."""
    global _second_text
    current = now()
    second = (current.year, current.month, current.day, current.hour, current.minute, current.second)
    key, text = _second_text
    if key != second:
        text = current.isoformat(timespec="seconds")[:19]
        _second_text = (second, text)
    return text + _MILLISECOND_TEXT[current.microsecond // 1000]
