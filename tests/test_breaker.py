"""The breaker's state machine, driven by an injected clock, alone and under threads.

The diagram (seed/architecture.md): CLOSED -(threshold failures)-> OPEN -(timeout)->
HALF_OPEN -(success)-> CLOSED, HALF_OPEN -(failure)-> OPEN.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from authapp import database
from authapp.breaker import BreakerOpen, CircuitBreaker, State
from authapp.extensions import db

CLOSED, OPEN, HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN
ALLOWED_EDGES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}


class Clock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class Failure(Exception):
    """What the tests raise for a failed call."""


class Answered(Exception):
    """An error the database answered with (a unique violation, say): not a failure."""


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def transitions() -> list[tuple[State, State]]:
    return []


def make(clock, transitions, threshold=3, timeout=10, half_open_max_calls=1) -> CircuitBreaker:
    return CircuitBreaker(
        threshold,
        timeout,
        half_open_max_calls,
        clock=clock,
        is_failure=lambda exc: isinstance(exc, Failure),
        on_transition=lambda old, new: transitions.append((old, new)),
    )


def fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(Failure), breaker.guard():
        raise Failure()


def succeed(breaker: CircuitBreaker) -> None:
    with breaker.guard():
        pass


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        fail(breaker)
    assert breaker.state is OPEN


# -- Every transition of the diagram ----------------------------------------------------


def test_starts_closed_and_successes_keep_it_closed(clock, transitions):
    breaker = make(clock, transitions)
    for _ in range(10):
        succeed(breaker)
    assert breaker.state is CLOSED and transitions == []


def test_closed_to_open_after_threshold_consecutive_failures(clock, transitions):
    breaker = make(clock, transitions, threshold=3)
    fail(breaker)
    fail(breaker)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN)]


def test_a_success_resets_the_count_of_consecutive_failures(clock, transitions):
    breaker = make(clock, transitions, threshold=3)
    for _ in range(5):
        fail(breaker)
        fail(breaker)
        succeed(breaker)
    assert breaker.state is CLOSED and transitions == []
    assert breaker.stats()["consecutive_failures"] == 0


def test_an_error_the_database_answered_is_not_a_failure(clock, transitions):
    breaker = make(clock, transitions, threshold=2)
    fail(breaker)
    for _ in range(5):
        with pytest.raises(Answered), breaker.guard():
            raise Answered()
    fail(breaker)
    assert breaker.state is CLOSED, "the answered errors reset the count like successes"


def test_open_refuses_without_calling_and_counts_down_retry_after(clock, transitions):
    breaker = make(clock, transitions, timeout=10)
    open_breaker(breaker)
    calls = []
    for elapsed, expected in ((0, 10), (0.5, 10), (4.2, 6), (9.01, 1)):
        clock.now = 1000.0 + elapsed
        with pytest.raises(BreakerOpen) as refused:
            with breaker.guard():
                calls.append(elapsed)
        assert refused.value.retry_after == expected
    assert calls == []
    assert breaker.stats()["rejected_calls"] == 4
    assert transitions == [(CLOSED, OPEN)]


def test_open_to_half_open_when_the_timeout_has_passed(clock, transitions):
    breaker = make(clock, transitions, timeout=10)
    open_breaker(breaker)
    clock.advance(9.999)
    assert breaker.state is OPEN
    clock.advance(0.001)
    assert breaker.state is HALF_OPEN
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_half_open_to_closed_on_a_successful_trial(clock, transitions):
    breaker = make(clock, transitions, timeout=10)
    open_breaker(breaker)
    clock.advance(10)
    succeed(breaker)
    assert breaker.state is CLOSED
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # Closed again means a fresh count: it takes the full threshold to reopen.
    fail(breaker)
    fail(breaker)
    assert breaker.state is CLOSED


def test_half_open_to_open_on_a_failed_trial_restarts_the_timeout(clock, transitions):
    breaker = make(clock, transitions, timeout=10)
    open_breaker(breaker)
    clock.advance(25)
    fail(breaker)
    assert breaker.state is OPEN
    with pytest.raises(BreakerOpen) as refused:
        breaker.before_call()
    assert refused.value.retry_after == 10
    clock.advance(10)
    assert breaker.state is HALF_OPEN
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_half_open_admits_only_max_calls_trials(clock, transitions):
    breaker = make(clock, transitions, timeout=10, half_open_max_calls=2)
    open_breaker(breaker)
    clock.advance(10)
    breaker.before_call()
    breaker.before_call()
    with pytest.raises(BreakerOpen) as refused:
        breaker.before_call()
    assert refused.value.retry_after == 1
    breaker.record_success()
    assert breaker.state is CLOSED
    breaker.record_success()  # the second trial reports after the first closed it
    assert breaker.state is CLOSED
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_late_failure_while_open_changes_nothing(clock, transitions):
    breaker = make(clock, transitions, timeout=10)
    breaker.before_call()  # admitted while closed, answers after the breaker opened
    open_breaker(breaker)
    breaker.record_failure()
    assert transitions == [(CLOSED, OPEN)]
    with pytest.raises(BreakerOpen) as refused:
        breaker.before_call()
    assert refused.value.retry_after == 10


def test_stats_count_transitions(clock, transitions):
    breaker = make(clock, transitions, timeout=10)
    open_breaker(breaker)
    clock.advance(10)
    fail(breaker)
    clock.advance(10)
    succeed(breaker)
    assert breaker.stats() == {
        "state": "closed",
        "consecutive_failures": 0,
        "rejected_calls": 0,
        "transitions": {
            "closed->open": 1,
            "open->half_open": 2,
            "half_open->open": 1,
            "half_open->closed": 1,
        },
    }


def test_listeners_see_each_transition_and_a_broken_one_breaks_nothing(clock, transitions, caplog):
    breaker = make(clock, transitions, threshold=1, timeout=10)
    seen = []

    def broken(old, new):
        raise RuntimeError("metrics backend down")

    breaker.add_listener(broken)
    breaker.add_listener(lambda old, new: seen.append((old, new, breaker.state)))
    fail(breaker)
    clock.advance(10)
    succeed(breaker)
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert seen == [(CLOSED, OPEN, OPEN), (OPEN, HALF_OPEN, HALF_OPEN), (HALF_OPEN, CLOSED, CLOSED)], (
        "a listener may read the state (no deadlock)"
    )
    assert sum("listener failed" in r.getMessage() for r in caplog.records) == 3


def test_transitions_are_logged(clock, transitions, caplog):
    breaker = make(clock, transitions, threshold=1, timeout=10)
    fail(breaker)
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "breaker_transition"]
    assert (record.from_state, record.to_state, record.transitions_total) == ("closed", "open", 1)


# -- Threads ----------------------------------------------------------------------------


@pytest.fixture
def racy() -> Iterator[None]:
    """Switch threads as often as the interpreter can, so that an unlocked read-modify-write
    would lose updates."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def run_threads(count: int, target) -> None:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: deadlock?"
    assert errors == []


def half_open_round(clock: Clock, outcome: str) -> tuple[list[int], list[int], list]:
    """16 threads knock at once on a half-open breaker that admits 3 trials; the trials
    report only when every thread has knocked."""
    transitions: list[tuple[State, State]] = []
    breaker = make(clock, transitions, threshold=1, timeout=10, half_open_max_calls=3)
    open_breaker(breaker)
    clock.advance(10)
    barrier = threading.Barrier(16)
    admitted: list[int] = []
    refused: list[int] = []
    tried = threading.Semaphore(0)
    all_tried = threading.Event()

    def call(i: int) -> None:
        barrier.wait()
        try:
            breaker.before_call()
        except BreakerOpen as exc:
            refused.append(exc.retry_after)
            return
        finally:
            tried.release()
        admitted.append(i)
        assert all_tried.wait(timeout=30)
        breaker.record_success() if outcome == "success" else breaker.record_failure()

    def count() -> None:
        for _ in range(16):
            tried.acquire(timeout=30)
        all_tried.set()

    counter = threading.Thread(target=count)
    counter.start()
    run_threads(16, call)
    counter.join(timeout=30)
    return admitted, refused, transitions


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_half_open_call_limit_under_concurrent_threads(clock, outcome, racy):
    for _ in range(50):  # a race that one round misses, another hits
        admitted, refused, transitions = half_open_round(clock, outcome)
        assert len(admitted) == 3
        assert refused == [1] * 13
        expected = (HALF_OPEN, CLOSED) if outcome == "success" else (HALF_OPEN, OPEN)
        assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), expected], "one transition however many trials report"


def test_failures_from_16_threads_are_all_counted(clock, transitions, racy):
    calls = 500
    breaker = make(clock, transitions, threshold=16 * calls + 1)
    run_threads(16, lambda _i: [breaker.record_failure() for _ in range(calls)])
    assert breaker.state is CLOSED
    assert breaker.stats()["consecutive_failures"] == 16 * calls
    breaker.record_failure()
    assert breaker.state is OPEN and transitions == [(CLOSED, OPEN)]


def test_16_threads_hammering_it_keep_the_state_machine_whole(clock, transitions, racy):
    breaker = make(clock, transitions, threshold=3, timeout=0.05, half_open_max_calls=2)
    admitted, refused, outcomes = [0] * 16, [0] * 16, [0] * 16

    def hammer(i: int) -> None:
        rng = random.Random(i)
        for _ in range(2000):
            if rng.random() < 0.05:
                clock.advance(0.01)
            try:
                with breaker.guard():
                    admitted[i] += 1
                    if rng.random() < 0.4:
                        raise Failure()
            except BreakerOpen:
                refused[i] += 1
            except Failure:
                outcomes[i] += 1

    run_threads(16, hammer)
    assert sum(admitted) + sum(refused) == 16 * 2000
    assert transitions, "the workload must drive the breaker around its diagram"
    assert {edge for edge in transitions} == ALLOWED_EDGES, "every edge of the diagram was taken"
    assert transitions[0] == (CLOSED, OPEN)
    for i, ((_, to), (frm, _)) in enumerate(zip(transitions, transitions[1:], strict=False)):
        assert to == frm, f"transition {i + 1} starts where none ended: {transitions[max(0, i - 2) : i + 3]}"
    counted = breaker.stats()["transitions"]
    for edge in ALLOWED_EDGES:
        assert counted[f"{edge[0].value}->{edge[1].value}"] == transitions.count(edge)
    assert breaker.stats()["rejected_calls"] == sum(refused)


# -- In the app: what counts, and what must go through it -----------------------------


@pytest.fixture
def settings():
    return {"CIRCUIT_BREAKER_THRESHOLD": "2"}


def test_conflicts_and_validation_errors_never_count(app, client, register):
    register(username="alice", email="alice@example.com")
    body = {"email": "alice@example.com", "username": "alice", "password": "violet-harbor-cactus-42"}
    wrong = {"username": "alice", "password": "wrong-one!"}
    for _ in range(5):
        assert client.post("/auth/register", json=body).status_code == 409
        assert client.post("/auth/register", json={"email": "nope"}).status_code == 400
        assert client.post("/auth/login", json=wrong).status_code == 401
    with app.app_context():
        stats = database.breaker().stats()
    assert stats["state"] == "closed" and stats["consecutive_failures"] == 0 and stats["transitions"] == {}


def test_errors_the_database_answered_never_count(app):
    """IntegrityError raised inside unit_of_work(): the database answered, so the breaker
    records a success, whatever the pre-checks of the routes do."""
    from sqlalchemy.exc import IntegrityError

    from authapp.models import User

    def duplicate():
        with database.unit_of_work() as session:
            session.add(User(email="dup@example.com", username="dup", hashed_password="x"))

    with app.test_request_context():
        duplicate()
        for _ in range(5):
            with pytest.raises(IntegrityError):
                duplicate()
        stats = database.breaker().stats()
    assert stats["state"] == "closed" and stats["consecutive_failures"] == 0 and stats["transitions"] == {}


def test_a_request_that_bypasses_unit_of_work_is_caught(app, outside_unit_of_work):
    def sneaky():
        db.session.execute(text("SELECT 1"))
        return {"ok": True}

    app.add_url_rule("/sneaky", view_func=sneaky)
    assert app.test_client().get("/sneaky").status_code == 200
    assert [r.getMessage() for r in outside_unit_of_work] == ["database used outside unit_of_work()"]
    outside_unit_of_work.clear()  # provoked on purpose


def test_with_state_acts_before_any_transition_can_come_between():
    """What /metrics relies on to never write an older state over a newer one."""
    breaker = CircuitBreaker(threshold=1, timeout=30)

    def trip() -> None:
        breaker.before_call()
        breaker.record_failure()

    other = threading.Thread(target=trip)
    seen = []

    def action(state: State) -> State:
        other.start()
        other.join(0.3)
        seen.append((state, other.is_alive()))  # the transition waits for the lock
        return state

    assert breaker.with_state(action) is State.CLOSED
    other.join(5)
    assert seen == [(State.CLOSED, True)]
    assert breaker.state is State.OPEN


# -- half_open(): the probe ends the open period early ----------------------------------


def test_half_open_ends_the_open_period_at_once_and_trials_decide(clock, transitions):
    breaker = make(clock, transitions, timeout=60)
    open_breaker(breaker)
    assert breaker.half_open() is True
    assert breaker.state is HALF_OPEN, "no need to wait for the 60 s timeout"
    succeed(breaker)
    assert breaker.state is CLOSED
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_half_open_then_a_success_report_closes_it_without_a_trial_slot(clock, transitions):
    """What the probe does: it checked the database itself, so it reports the success."""
    breaker = make(clock, transitions, timeout=60)
    open_breaker(breaker)
    breaker.half_open()
    breaker.record_success()
    assert breaker.state is CLOSED and breaker.stats()["consecutive_failures"] == 0


def test_half_open_changes_nothing_unless_open(clock, transitions):
    breaker = make(clock, transitions, timeout=10, half_open_max_calls=1)
    assert breaker.half_open() is False and breaker.state is CLOSED
    open_breaker(breaker)
    clock.advance(10)
    breaker.before_call()  # the one trial is out
    assert breaker.half_open() is False
    with pytest.raises(BreakerOpen):
        breaker.before_call()  # half_open() did not hand out a second trial slot
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_trip_opens_at_once_whatever_the_count(clock, transitions):
    breaker = make(clock, transitions, threshold=5, timeout=10)
    breaker.trip()
    assert breaker.state is OPEN and transitions == [(CLOSED, OPEN)]
    breaker.trip()  # already open: the open period is not extended
    clock.advance(10)
    assert breaker.state is HALF_OPEN
    breaker.trip()
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
