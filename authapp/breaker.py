"""A thread-safe circuit breaker around the database (one per process).

CLOSED: calls go through; `threshold` consecutive connectivity failures open it.
OPEN: calls are refused at once until `timeout` seconds have passed.
HALF_OPEN: up to `half_open_max_calls` trial calls go through; a success closes the
breaker, a failure opens it again. `half_open()` ends the open period early, when
something outside the breaker (authapp.probe) saw the database answer; `trip()` opens it
at once, for a failure every call would repeat. Only failures to reach the database
count; a query the database answered (even with an error such as a unique violation) is
a success.

Every transition is logged (`event: breaker_transition`) and passed to the listeners
(`on_transition`, `add_listener`), so a metrics exporter can count them; `stats()` gives
the current state and the counters since start.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


Listener = Callable[[State, State], None]


class CircuitBreaker:
    """One per process, shared by its threads; every method may be called from any thread."""

    def __init__(
        self,
        threshold: int,
        timeout: float,
        half_open_max_calls: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        is_failure: Callable[[BaseException], bool] = lambda exc: True,
        on_transition: Listener | None = None,
        name: str = "database",
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.timeout = timeout
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._is_failure = is_failure
        self._listeners: list[Listener] = [on_transition] if on_transition is not None else []
        # Re-entrant: a listener runs under the lock (so listeners see transitions in
        # order) and may read `state` or `stats()`.
        self._lock = threading.RLock()
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0
        self._rejected = 0
        self._transitions: Counter[tuple[State, State]] = Counter()

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(old, new)` on every transition; it must be quick (a counter bump)."""
        with self._lock:
            self._listeners.append(listener)

    def stats(self) -> dict[str, Any]:
        """The state and counters since start, for metrics and the health check."""
        with self._lock:
            self._advance()
            return {
                "state": self._state.value,
                "consecutive_failures": self._failures,
                "rejected_calls": self._rejected,
                "transitions": {f"{a.value}->{b.value}": n for (a, b), n in self._transitions.items()},
            }

    @property
    def state(self) -> State:
        with self._lock:
            self._advance()
            return self._state

    def with_state(self, action: Callable[[State], Any]) -> Any:
        """`action(state)` under the breaker's lock: no transition can come between reading
        the state and acting on it (a listener publishing transitions won't be overwritten)."""
        with self._lock:
            self._advance()
            return action(self._state)

    def _advance(self) -> None:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.timeout:
            self._trials = 0
            self._move(State.HALF_OPEN)

    def _move(self, new: State) -> None:
        old, self._state = self._state, new
        if old is new:
            return
        self._transitions[old, new] += 1
        log.warning(
            "%s circuit breaker %s -> %s",
            self.name,
            old.value,
            new.value,
            extra={
                "event": "breaker_transition",
                "breaker": self.name,
                "from_state": old.value,
                "to_state": new.value,
                "transitions_total": self._transitions[old, new],
            },
        )
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception:
                # A broken metrics hook must not break the breaker or the request.
                log.exception("circuit breaker listener failed", extra={"event": "breaker_listener_error"})

    def half_open(self) -> bool:
        """End the open period now (something outside saw the database answer): OPEN ->
        HALF_OPEN, so that the next calls are the trials. False when it was not open."""
        with self._lock:
            self._advance()
            if self._state is not State.OPEN:
                return False
            self._trials = 0
            self._move(State.HALF_OPEN)
            return True

    def trip(self) -> None:
        """Open now, whatever the count: a failure that every call would repeat (the
        database refuses writes) while other calls may still succeed and reset the count."""
        with self._lock:
            self._advance()
            if self._state is not State.OPEN:
                self._open()

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.timeout - (self._clock() - self._opened_at)))

    def before_call(self) -> None:
        """Admit a call or raise BreakerOpen; every admitted call must be reported back."""
        with self._lock:
            self._advance()
            if self._state is State.OPEN:
                self._rejected += 1
                raise BreakerOpen(self._retry_after())
            if self._state is State.HALF_OPEN:
                if self._trials >= self.half_open_max_calls:
                    self._rejected += 1
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
            elif self._state is State.CLOSED:
                self._failures += 1
                if self._failures >= self.threshold:
                    self._open()
            # OPEN: a call admitted before the breaker opened failed late; it is open already.

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
