"""A thread-safe circuit breaker around the database (one per process).

CLOSED: calls go through; `threshold` consecutive connectivity failures open it.
OPEN: calls are refused at once until `timeout` seconds have passed.
HALF_OPEN: up to `half_open_max_calls` trial calls go through; a success closes the
breaker, a failure opens it again. Only failures to reach the database count; a query
the database answered (even with an error such as a unique violation) is a success.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("authapp.breaker")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerOpen(Exception):
    """Refused without trying; `retry_after` is the whole seconds until a trial is allowed."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"circuit breaker open, retry after {retry_after}s")
        self.retry_after = retry_after


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        timeout: float,
        half_open_max_calls: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        is_failure: Callable[[BaseException], bool] = lambda exc: True,
        on_transition: Callable[[State, State], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.timeout = timeout
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._is_failure = is_failure
        self._on_transition = on_transition
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0

    @property
    def state(self) -> State:
        with self._lock:
            self._advance()
            return self._state

    def _advance(self) -> None:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.timeout:
            self._move(State.HALF_OPEN)
            self._trials = 0

    def _move(self, new: State) -> None:
        old, self._state = self._state, new
        if old is not new:
            log.warning(
                "circuit breaker %s -> %s",
                old.value,
                new.value,
                extra={"event": "breaker_transition", "from_state": old.value, "to_state": new.value},
            )
            if self._on_transition is not None:
                self._on_transition(old, new)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.timeout - (self._clock() - self._opened_at)))

    def before_call(self) -> None:
        """Admit a call or raise BreakerOpen; every admitted call must be reported back."""
        with self._lock:
            self._advance()
            if self._state is State.OPEN:
                raise BreakerOpen(self._retry_after())
            if self._state is State.HALF_OPEN:
                if self._trials >= self.half_open_max_calls:
                    raise BreakerOpen(1)
                self._trials += 1

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            if self._state is State.HALF_OPEN:
                self._trials = 0
                self._move(State.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            if self._state is State.HALF_OPEN:
                self._open()
                return
            self._failures += 1
            if self._state is State.CLOSED and self._failures >= self.threshold:
                self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._failures = 0
        self._trials = 0
        self._move(State.OPEN)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run a block as one call through the breaker."""
        self.before_call()
        try:
            yield
        except BaseException as exc:
            if self._is_failure(exc):
                self.record_failure()
            else:
                self.record_success()
            raise
        self.record_success()
