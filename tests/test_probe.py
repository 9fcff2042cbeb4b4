"""The background probe of an open breaker (authapp/probe.py), with a check the test
controls: started lazily when the breaker opens, backs off, closes the breaker as soon as
the check succeeds and only then, and starts a thread of its own in a forked child."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from helpers import wait_until

from authapp.breaker import CircuitBreaker, State
from authapp.probe import FIRST_INTERVAL, DatabaseProbe


class Database:
    """A check that fails while `down` is set, counting its calls."""

    def __init__(self) -> None:
        self.down = True
        self.calls: list[float] = []
        self.recovered = 0

    def check(self) -> None:
        self.calls.append(time.monotonic())
        if self.down:
            raise ConnectionRefusedError("connection refused")


@pytest.fixture
def database() -> Database:
    return Database()


@pytest.fixture
def probe(database) -> Iterator[DatabaseProbe]:
    breaker = CircuitBreaker(threshold=1, timeout=60)

    def recovered() -> None:
        database.recovered += 1

    probe = DatabaseProbe(breaker, database.check, max_interval=0.4, on_recovered=recovered)
    yield probe
    probe.stop()
    assert not probe.running


def trip(probe: DatabaseProbe) -> None:
    probe.breaker.before_call()
    probe.breaker.record_failure()


def test_no_thread_until_the_breaker_opens(probe, database):
    time.sleep(0.2)
    assert not probe.running and database.calls == []
    trip(probe)
    wait_until(lambda: len(database.calls) >= 1, 5, "the first check")
    assert probe.running


def test_closes_the_breaker_as_soon_as_the_check_succeeds(probe, database):
    trip(probe)
    wait_until(lambda: len(database.calls) >= 3, 5, "checks while down")
    assert probe.breaker.state is State.OPEN, "never closed while the check fails"
    assert probe.last_error == "ConnectionRefusedError"
    database.down = False
    back = time.monotonic()
    wait_until(lambda: probe.breaker.state is State.CLOSED, 5, "the breaker to close")
    assert time.monotonic() - back < 0.4 + 0.5, "within the longest interval"
    assert database.recovered == 1 and probe.last_error is None
    assert probe.breaker.stats()["transitions"] == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_backs_off_to_the_longest_interval_and_no_further(probe, database):
    trip(probe)
    time.sleep(2.0)
    calls = database.calls
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert FIRST_INTERVAL * 0.9 <= gaps[0] < 0.3
    assert all(gap < 0.4 + 0.3 for gap in gaps), gaps
    assert max(gaps) >= 0.35, "it grew to the longest interval"
    # 50, 100, 200 ms, then every 400 ms: about 7 checks in 2 s, not one per request.
    assert 4 <= len(calls) <= 10, len(calls)
    assert 1 <= probe.retry_after() <= 1


def test_opens_again_and_the_probe_wakes_again(probe, database):
    trip(probe)
    database.down = False
    wait_until(lambda: probe.breaker.state is State.CLOSED, 5, "the first recovery")
    database.down = True
    trip(probe)
    assert probe.breaker.state is State.OPEN
    database.down = False
    wait_until(lambda: probe.breaker.state is State.CLOSED, 5, "the second recovery")
    assert database.recovered == 2


# Python 3.12+ warns on fork() in a process with threads; the child runs its own.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_runs_a_probe_thread_of_its_own(probe, database):
    trip(probe)
    wait_until(lambda: probe.running, 5, "the parent's probe thread")
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            alive_at_fork = probe.running  # the parent's thread does not exist here
            database.down = False
            probe.start()
            deadline = time.monotonic() + 5
            while probe.breaker.state is not State.CLOSED and time.monotonic() < deadline:
                time.sleep(0.02)
            os.write(writer, f"{alive_at_fork} {probe.breaker.state.value}".encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        answer = pipe.read()
    os.waitpid(child, 0)
    assert answer == "False closed", answer
    assert probe.breaker.state is State.OPEN, "the parent's database is still down"


def test_a_breaker_closed_by_a_trial_request_forgets_the_last_failure(probe, database):
    """Readiness reads `last_failure` while the breaker is open; once a trial request has
    closed it, an old failure (a read-only database, say) must not describe the next outage."""
    trip(probe)
    wait_until(lambda: probe.last_failure is ConnectionRefusedError, 5, "a failed check")
    assert probe.last_error == "ConnectionRefusedError"
    assert probe.breaker.half_open()  # what a request does once the breaker's timeout has passed
    probe.breaker.record_success()
    assert probe.breaker.state is State.CLOSED
    assert (probe.last_failure, probe.last_error) == (None, None)
