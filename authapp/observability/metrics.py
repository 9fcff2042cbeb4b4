"""Prometheus metrics at GET /metrics: requests by endpoint and status, auth events, the
database pool and the circuit breaker.

Under uWSGI every worker is a process with counters of its own. With
PROMETHEUS_MULTIPROC_DIR set (an empty directory per instance), prometheus_client keeps
each worker's values in a memory-mapped file there, and /metrics adds up the files of all
the workers, so whichever worker answers a scrape reports the whole instance. The files
are named after the uWSGI worker id rather than the pid: a worker that uWSGI replaces
(max-requests, reload-on-rss, harakiri) takes over its predecessor's file, so its counters
carry on and the directory does not grow. Without the variable (`flask run`, the unit
tests) the values live in the process and /metrics reports that process.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from flask import Flask, Response, current_app, request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from .. import audit, clock, database
from ..breaker import State
from ..errors import AppError
from ..extensions import db
from ..openapi import Blueprint

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_EXTENSION = "authapp.metrics"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"
# Latency buckets (seconds): /auth/me and /health/live answer in about a millisecond, a
# login or a registration in one bcrypt operation (about 0.25 s at cost 12).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Series shown at 0 from the start, so that rate() and alerts see them before the first event.
KNOWN_AUTH_EVENTS = (
    (audit.REGISTER, ""),
    (audit.LOGIN_SUCCESS, ""),
    (audit.LOGIN_FAILURE, "unknown_user"),
    (audit.LOGIN_FAILURE, "wrong_password"),
    (audit.LOGIN_FAILURE, "inactive_user"),
    (audit.REFRESH, ""),
    (audit.REFRESH_REPLAY, ""),
    (audit.REUSE_DETECTED, ""),
)
# The outbox's outcomes (authapp/mail), by the audit event that records each.
MAIL_OUTCOMES = {
    audit.MAIL_QUEUED: "queued",
    audit.MAIL_SUPPRESSED: "suppressed",
    audit.MAIL_SENT: "sent",
    audit.MAIL_RETRY: "retried",
    audit.MAIL_GIVEN_UP: "given_up",
}

# Multi-factor authentication's outcomes (authapp/auth/mfa.py), by the audit event of each.
MFA_OUTCOMES = {
    audit.MFA_ENABLED: "enabled",
    audit.MFA_DISABLED: "disabled",
    audit.MFA_CHALLENGE_ISSUED: "challenged",
    audit.MFA_CHALLENGE_FAILED: "failed",
    audit.MFA_ENABLE_FAILED: "enable_failed",
    audit.RECOVERY_CODE_USED: "recovery_code_used",
    audit.RECOVERY_CODES_REGENERATED: "recovery_codes_regenerated",
}


def multiprocess_dir() -> str | None:
    """The directory prometheus_client writes to, as it reads it: from the environment."""
    return os.environ.get(MULTIPROC_DIR_VARIABLE)


def _use_uwsgi_worker_ids() -> None:
    """Name the multiprocess files after uWSGI's worker id (1..processes) instead of the pid.

    prometheus_client requires the identifier to differ between processes running at the
    same time, which worker ids do within one instance: uWSGI starts a worker's
    replacement only after the worker has exited. One directory per instance keeps two
    instances apart.
    """
    try:
        import uwsgi  # present only inside uWSGI
    except ImportError:
        return
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: f"w{uwsgi.worker_id()}")


class Metrics:
    """The app's Prometheus instruments and what it must remember between requests: the
    label of each route, the two series of each label set (two dict lookups per request
    instead of two `labels()` calls), and the breaker state and pool usage it last wrote.

    Each app has a registry of its own; in multiprocess mode the values live in the
    directory's files and a scrape adds those up instead (`render`).
    """

    def __init__(self, app: Flask) -> None:
        if multiprocess_dir() is not None:
            _use_uwsgi_worker_ids()
        self.breaker = database.breaker_of(app)  # made by database.init_app before
        self.registry = CollectorRegistry()
        if multiprocess_dir() is None:  # what prometheus_client's default registry shows
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        registry = self.registry
        self.requests = Counter(
            "authapp_http_requests",
            "HTTP requests answered, by method, endpoint (the route's path) and status.",
            ["method", "endpoint", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "authapp_http_request_duration_seconds",
            "Time from the request reaching the app to its answer starting, by method, endpoint and status.",
            ["method", "endpoint", "status"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.auth_events = Counter(
            "authapp_auth_events",
            "Security events of the audit trail (login_success, login_failure, register, "
            "refresh, refresh_reuse_detected, ...), with the failure reason when there is one.",
            ["event", "reason"],
            registry=registry,
        )
        self.pool_in_use = Gauge(
            "authapp_db_pool_connections_in_use",
            "Database connections checked out of the pool, summed over worker processes.",
            multiprocess_mode="sum",
            registry=registry,
        )
        self.pool_open = Gauge(
            "authapp_db_pool_connections_open",
            "Database connections open (in use or idle in the pool), summed over worker processes.",
            multiprocess_mode="sum",
            registry=registry,
        )
        self.pool_size = Gauge(
            "authapp_db_pool_size",
            "Connections each worker process's pool keeps (overflow not counted).",
            multiprocess_mode="max",
            registry=registry,
        )
        self.breaker_state = Gauge(
            "authapp_circuit_breaker_state",
            "Worker processes whose database circuit breaker is in each state.",
            ["state"],
            multiprocess_mode="sum",
            registry=registry,
        )
        for event_name, reason in KNOWN_AUTH_EVENTS:
            self.auth_events.labels(event_name, reason)
        self.mail_messages = Counter(
            "authapp_mail_messages",
            "Outbox messages by outcome: queued, suppressed (MAIL_RATE_LIMIT), sent, retried "
            "(a failed attempt, tried again later) and given_up; counted by the process that "
            "saw the outcome (the couriers report theirs on --metrics-port).",
            ["outcome"],
            registry=registry,
        )
        for outcome in MAIL_OUTCOMES.values():
            self.mail_messages.labels(outcome)
        self.mfa_events = Counter(
            "authapp_mfa_events",
            "Multi-factor authentication by outcome: enabled, disabled, challenged (a right "
            "password, the second factor asked for), verified (a session at aal2), failed (a "
            "wrong, reused or late code at the second step of a login), enable_failed (a wrong "
            "code when turning MFA on), recovery_code_used, recovery_codes_regenerated.",
            ["outcome"],
            registry=registry,
        )
        for outcome in (*MFA_OUTCOMES.values(), "verified"):
            self.mfa_events.labels(outcome)
        self.mail_waiting = Gauge(
            "authapp_mail_outbox_waiting",
            "Messages in the outbox waiting to be delivered (queued or being sent), read from the "
            "database at each scrape.",
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.mail_oldest_age = Gauge(
            "authapp_mail_outbox_oldest_age_seconds",
            "Age of the oldest message waiting in the outbox (0 when none), read from the database at each scrape.",
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self._endpoints: dict[str, str] = {}
        self._series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._by_request: dict[tuple[str, str | None, int], tuple[Any, Any]] = {}
        self._next_publish = 0.0
        # Keyed by pid too: a process forked after a write has files of its own.
        self._published_breaker: tuple[int, State] | None = None
        self._published_pool: tuple[int, int, int] | None = None
        self._write_breaker_state(State.CLOSED)

    # -- Requests -------------------------------------------------------------------------

    def _endpoint_label(self, rule: str | None) -> str:
        """The matched route as OpenAPI writes it (/auth/sessions/{session_id}); bounded, unlike paths."""
        if rule is None:
            return UNMATCHED
        label = self._endpoints.get(rule)
        if label is None:
            label = self._endpoints[rule] = _RULE_ARGUMENT.sub(r"{\1}", rule)
        return label

    def series_of(self, method: str, rule: str | None, status: int) -> tuple[Any, Any]:
        """The request counter's and the duration histogram's children of one request's
        labels, looked up (`labels()`) once per method, route and status, then kept: a
        request of a known method, route and status finds them in one dict lookup. (Both
        dicts are bounded: methods outside _METHODS are "OTHER" and kept under that.)"""
        known = self._by_request.get((method, rule, status))
        if known is not None:
            return known
        label_method = method if method in _METHODS else "OTHER"
        key = (label_method, self._endpoint_label(rule), str(status))
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (self.requests.labels(*key), self.duration.labels(*key))
        if label_method == method:
            self._by_request[(method, rule, status)] = series
        return series

    def observe(self, method: str, rule: str | None, status: int, seconds: float, *, in_app: bool = True) -> None:
        """Count one answered request and its duration (requests.RequestObserver calls it);
        now and then, inside the app's contexts (`in_app`), write the breaker state and the
        pool usage."""
        series = self.series_of(method, rule, status)
        series[0].inc()
        series[1].observe(seconds)
        if not in_app:  # the pool is the app's, out of reach here: the next request writes it
            return
        now = time.perf_counter()
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_INTERVAL_SECONDS
            self.publish_breaker_state()
            self.publish_pool_usage()
        elif database.used_database():
            # Its connection is back in the pool: so the last request of a burst always
            # leaves the figures of an idle pool, not those of the burst.
            self.publish_pool_usage()

    def count_audit_event(self, event_name: str, fields: dict[str, Any]) -> None:
        self.auth_events.labels(event_name, fields.get("reason") or "").inc()
        outcome = MAIL_OUTCOMES.get(event_name)
        if outcome is not None:
            self.mail_messages.labels(outcome).inc()
        mfa_outcome = MFA_OUTCOMES.get(event_name)
        if event_name == audit.LOGIN_SUCCESS and fields.get("aal") == "aal2":
            mfa_outcome = "verified"
        if mfa_outcome is not None:
            self.mfa_events.labels(mfa_outcome).inc()

    def publish_outbox(self) -> None:
        """Read the outbox's backlog from the database (skipped while it is unreachable:
        the gauges keep their last values and the scrape still answers)."""
        from ..mail import outbox

        if self.breaker.state is not State.CLOSED:  # a scrape is no trial call of the breaker
            return
        try:
            with database.autocommit_read() as connection:
                waiting, oldest = outbox.queue_stats(connection, clock.now())
        except AppError:
            return
        self.mail_waiting.set(waiting)
        self.mail_oldest_age.set(oldest)

    # -- Database pool --------------------------------------------------------------------

    def publish_pool_usage(self) -> None:
        """Write this worker's pool usage, read from the pool itself (not counted from pool
        events, which drift when connections are invalidated, detached or disposed).

        Written after every request that used the database and once a second, and by the
        scrape, so that a scrape served by one worker sees the others' figures as they
        were when their last request ended.
        """
        pool = db.engine.pool
        checked_out = getattr(pool, "checkedout", None)
        checked_in = getattr(pool, "checkedin", None)
        if not (callable(checked_out) and callable(checked_in)):
            return
        in_use = checked_out()
        current = (os.getpid(), in_use, in_use + checked_in())
        if self._published_pool != current:
            self.pool_in_use.set(current[1])
            self.pool_open.set(current[2])
            self._published_pool = current

    def publish_pool_size(self) -> None:
        size = getattr(db.engine.pool, "size", None)
        if callable(size):
            self.pool_size.set(size())

    # -- Circuit breaker ------------------------------------------------------------------

    def _write_breaker_state(self, state: State) -> None:
        current = (os.getpid(), state)
        if self._published_breaker != current:
            for candidate in State:
                self.breaker_state.labels(candidate.value).set(1 if candidate is state else 0)
            self._published_breaker = current

    def publish_breaker_state(self) -> None:
        """Write this worker's breaker state when it changed since it was last written.

        Each worker has its own breaker; the state is written at every transition (a
        listener, `watch_breaker`), and once a second by `observe` (a process forked after
        the last write has files of its own), so that a scrape served by another worker
        sees it. Under the breaker's lock, so that a transition cannot come between
        reading and writing.
        """
        self.breaker.with_state(self._write_breaker_state)

    def watch_breaker(self) -> None:
        """Write every transition of the app's breaker at once. The listener runs under the
        breaker's lock."""
        self.breaker.add_listener(lambda _old, new: self._write_breaker_state(new))

    # -- Scrapes --------------------------------------------------------------------------

    def render(self, accept: str) -> Response:
        """This instance's metrics, every worker process included."""
        self.publish_breaker_state()
        self.publish_pool_usage()
        self.publish_pool_size()
        self.publish_outbox()
        directory = multiprocess_dir()
        registry = self.registry
        if directory is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)
        encoder, content_type = choose_encoder(accept)
        return Response(encoder(registry), headers={"Content-Type": content_type})


def of(app: Flask) -> Metrics:
    return app.extensions[_EXTENSION]


_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
# How often a worker writes its breaker state and pool usage besides every scrape it
# serves, every breaker transition and (pool usage) every request that used the
# database: writing them at the end of every request cost more than counting it.
PUBLISH_INTERVAL_SECONDS = 1.0


# -- The endpoint -------------------------------------------------------------------------------

blp = Blueprint("metrics", __name__, url_prefix="/metrics", description="Prometheus metrics")


@blp.get("")
@blp.doc(
    responses={
        "200": {
            "description": "Prometheus text format (OpenMetrics when the Accept header asks for it)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
)
def metrics_view() -> Response:
    """Metrics of this instance, every worker process included; nginx serves them on a
    loopback listener only."""
    return of(current_app._get_current_object()).render(request.headers.get("Accept", ""))  # type: ignore[attr-defined]


def init_app(app: Flask) -> Metrics:
    """Make the app's metrics, count its audit events, and follow its breaker (which
    `database.init_app` made before)."""
    metrics = app.extensions[_EXTENSION] = Metrics(app)
    audit.subscribe(app, metrics.count_audit_event)
    metrics.watch_breaker()
    return metrics
