"""While the process's circuit breaker is open, ask the database in the background whether
it answers again, so that service resumes within about a second of its return instead of
after the breaker's whole `CIRCUIT_BREAKER_TIMEOUT`.

One probe per process, with one daemon thread, started the first time the breaker opens
(so after uWSGI's fork: with `lazy-apps` each worker builds its own app, and a probe
inherited across a plain `os.fork()` starts a thread of its own in the child). The probe
checks at growing intervals (from `FIRST_INTERVAL` doubling up to `max_interval`), one
connection attempt each, never more: a dead database is not hammered. When a check
succeeds, the breaker is half-opened and closed through its public calls
(`half_open()`, `record_success()`); the requests after that go to the database again.
While it is open, requests are refused at once and told to come back (`Retry-After`)
when the next check is due.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable

from .breaker import CircuitBreaker, State

log = logging.getLogger("authapp.probe")

FIRST_INTERVAL = 0.05
_probes: weakref.WeakSet[DatabaseProbe] = weakref.WeakSet()


class DatabaseProbe:
    """Checks the database with `check()` (raises when it does not answer, or refuses
    writes) while `breaker` is open; `on_recovered()` runs before the breaker closes."""

    def __init__(
        self,
        breaker: CircuitBreaker,
        check: Callable[[], None],
        max_interval: float,
        *,
        describe: Callable[[BaseException], str] = lambda exc: type(exc).__name__,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self.breaker = breaker
        self.max_interval = max(FIRST_INTERVAL, max_interval)
        self._check = check
        self._describe = describe
        self._on_recovered = on_recovered
        self._reset()
        _probes.add(self)
        breaker.add_listener(self._on_transition)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._next_check_at = 0.0
        self.checks = 0
        self.last_error: str | None = None  # what the last failed check said (None: none failed)
        self.last_failure: type[BaseException] | None = None

    def _on_transition(self, _old: State, new: State) -> None:
        # Runs under the breaker's lock: only wake the thread, never check from here.
        if new is State.OPEN:
            self.start()
        elif new is State.CLOSED:
            # Closed by a trial request as well as by a check: the last failure is history.
            self.last_error = None
            self.last_failure = None

    def start(self) -> None:
        """Make sure the thread runs (in this process) and checks now."""
        with self._lock:
            if self._stop.is_set():
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="authapp-database-probe", daemon=True)
                self._thread.start()
            self._wake.set()

    def stop(self, timeout: float = 5) -> None:
        """End the thread (tests; a process that exits needs nothing: it is a daemon)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def retry_after(self) -> int:
        """Whole seconds until the next check is due (at least 1), for `Retry-After`."""
        return max(1, math.ceil(self._next_check_at - time.monotonic()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            self._probe_while_open()

    def _probe_while_open(self) -> None:
        interval = FIRST_INTERVAL
        opened = time.monotonic()
        while not self._stop.is_set() and self.breaker.state is State.OPEN:
            self._next_check_at = time.monotonic() + interval
            if self._stop.wait(interval):
                return
            if self.breaker.state is not State.OPEN:
                return  # a trial request got there first
            self.checks += 1
            try:
                self._check()
            except Exception as exc:
                reason = self._describe(exc)
                if reason != self.last_error:
                    log.warning(
                        "database probe: still unavailable: %s",
                        reason,
                        extra={"event": "database_probe_failed", "reason": reason},
                    )
                self.last_error = reason
                self.last_failure = type(exc)
                interval = min(interval * 2, self.max_interval)
                continue
            self.last_error = None
            self.last_failure = None
            if self._on_recovered is not None:
                try:
                    self._on_recovered()
                except Exception:
                    log.exception("database probe: recovery hook failed", extra={"event": "database_probe_error"})
            if self.breaker.half_open():
                self.breaker.record_success()
            log.warning(
                "database probe: the database answers again after %.1fs open",
                time.monotonic() - opened,
                extra={"event": "database_probe_recovered", "open_seconds": round(time.monotonic() - opened, 3)},
            )
            return


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here, and its locks may have been held at fork.
    for probe in list(_probes):
        probe._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
