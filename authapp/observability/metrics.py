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
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, g, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from .. import audit, database
from ..breaker import State
from ..database import breaker
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
        import uwsgi  # type: ignore[import-not-found]  # present only inside uWSGI
    except ImportError:
        return
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: f"w{uwsgi.worker_id()}")


@dataclass(frozen=True)
class Instruments:
    requests: Counter
    duration: Histogram
    auth_events: Counter
    pool_in_use: Gauge
    pool_open: Gauge
    pool_size: Gauge
    breaker_state: Gauge


_instruments: Instruments | None = None


def instruments() -> Instruments:
    """This process's metrics, made at the first call (after the settings were checked)."""
    global _instruments
    if _instruments is None:
        if multiprocess_dir() is not None:
            _use_uwsgi_worker_ids()
        _instruments = Instruments(
            requests=Counter(
                "authapp_http_requests",
                "HTTP requests answered, by method, endpoint (the route's path) and status.",
                ["method", "endpoint", "status"],
            ),
            duration=Histogram(
                "authapp_http_request_duration_seconds",
                "Time from the first request hook to the last, by method, endpoint and status.",
                ["method", "endpoint", "status"],
                buckets=BUCKETS,
            ),
            auth_events=Counter(
                "authapp_auth_events",
                "Security events of the audit trail (login_success, login_failure, register, "
                "refresh, refresh_reuse_detected, ...), with the failure reason when there is one.",
                ["event", "reason"],
            ),
            pool_in_use=Gauge(
                "authapp_db_pool_connections_in_use",
                "Database connections checked out of the pool, summed over worker processes.",
                multiprocess_mode="sum",
            ),
            pool_open=Gauge(
                "authapp_db_pool_connections_open",
                "Database connections open (in use or idle in the pool), summed over worker processes.",
                multiprocess_mode="sum",
            ),
            pool_size=Gauge(
                "authapp_db_pool_size",
                "Connections each worker process's pool keeps (overflow not counted).",
                multiprocess_mode="max",
            ),
            breaker_state=Gauge(
                "authapp_circuit_breaker_state",
                "Worker processes whose database circuit breaker is in each state.",
                ["state"],
                multiprocess_mode="sum",
            ),
        )
        audit.subscribe(_count_audit_event)
        for event_name, reason in KNOWN_AUTH_EVENTS:
            _instruments.auth_events.labels(event_name, reason)
    return _instruments


# -- Requests -----------------------------------------------------------------------------

_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
# Per process: the label of each route, and the two series of each label set, so that a
# request costs two dict lookups rather than two `labels()` calls (about 7 µs of 14 µs).
_endpoints: dict[str, str] = {}
_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _endpoint_label() -> str:
    """The matched route as OpenAPI writes it (/auth/sessions/{session_id}); bounded, unlike paths."""
    rule = request.url_rule
    if rule is None:
        return UNMATCHED
    label = _endpoints.get(rule.rule)
    if label is None:
        label = _endpoints[rule.rule] = _RULE_ARGUMENT.sub(r"{\1}", rule.rule)
    return label


# How often a worker writes its breaker state and pool usage besides every scrape it
# serves, every breaker transition and (pool usage) every request that used the
# database: writing them at the end of every request cost more than counting it.
PUBLISH_INTERVAL_SECONDS = 1.0
_next_publish = 0.0


def _observe(response: Response) -> Response:
    global _next_publish
    metrics = instruments()
    method = request.method if request.method in _METHODS else "OTHER"
    key = (method, _endpoint_label(), str(response.status_code))
    series = _series.get(key)
    if series is None:
        series = _series[key] = (metrics.requests.labels(*key), metrics.duration.labels(*key))
    series[0].inc()
    started = g.get("request_started")
    now = time.perf_counter()
    if started is not None:
        series[1].observe(now - started)
    if now >= _next_publish:
        _next_publish = now + PUBLISH_INTERVAL_SECONDS
        _publish_breaker_state(metrics)
        _publish_pool_usage(metrics)
    elif database.used_database():
        # Its connection is back in the pool: so the last request of a burst always
        # leaves the figures of an idle pool, not those of the burst.
        _publish_pool_usage(metrics)
    return response


# -- Auth events ----------------------------------------------------------------------------


def _count_audit_event(event_name: str, fields: dict[str, Any]) -> None:
    instruments().auth_events.labels(event_name, fields.get("reason") or "").inc()


# -- Database pool ----------------------------------------------------------------------------


def _publish_pool_usage(metrics: Instruments) -> None:
    """Write this worker's pool usage, read from the pool itself (not counted from pool
    events, which drift when connections are invalidated, detached or disposed).

    Written by `_observe` after every request that used the database and once a second,
    and by the scrape, so that a scrape served by one worker sees the others' figures as
    they were when their last request ended.
    """
    pool = db.engine.pool
    checked_out = getattr(pool, "checkedout", None)
    checked_in = getattr(pool, "checkedin", None)
    if not (callable(checked_out) and callable(checked_in)):
        return
    in_use = checked_out()
    current = (os.getpid(), in_use, in_use + checked_in())
    published = current_app.extensions[_EXTENSION]
    if published.get("pool") != current:
        metrics.pool_in_use.set(current[1])
        metrics.pool_open.set(current[2])
        published["pool"] = current


def _publish_pool_size(metrics: Instruments) -> None:
    size = getattr(db.engine.pool, "size", None)
    if callable(size):
        metrics.pool_size.set(size())


# -- Circuit breaker ----------------------------------------------------------------------------


def _publish_breaker_state(metrics: Instruments) -> None:
    """Write this worker's breaker state when it changed since it was last written.

    Each worker has its own breaker; the state is written at every transition (a
    listener, `watch`), and once a second by `_observe` (a process forked after the last
    write has files of its own), so that a scrape served by another worker sees it. Under
    the breaker's lock, so that a transition cannot come between reading and writing.
    """
    published = current_app.extensions[_EXTENSION]

    def write(state: State) -> None:
        # Keyed by pid too: a process forked from one that already published has files of its own.
        current = (os.getpid(), state)
        if published.get("breaker_state") != current:
            for candidate in State:
                metrics.breaker_state.labels(candidate.value).set(1 if candidate is state else 0)
            published["breaker_state"] = current

    breaker().with_state(write)


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
    metrics = instruments()
    _publish_breaker_state(metrics)
    _publish_pool_usage(metrics)
    _publish_pool_size(metrics)
    directory = multiprocess_dir()
    if directory is None:
        registry = REGISTRY
    else:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(registry), headers={"Content-Type": content_type})


def init_app(app: Flask) -> None:
    """Count every request, and publish this worker's breaker state (closed at start)."""
    metrics = instruments()
    for candidate in State:
        metrics.breaker_state.labels(candidate.value).set(1 if candidate is State.CLOSED else 0)
    app.extensions[_EXTENSION] = {"breaker_state": (os.getpid(), State.CLOSED)}
    app.after_request(_observe)


def watch_breaker(app: Flask) -> None:
    """Write every transition of the app's breaker at once (once it exists). The listener
    runs under the breaker's lock."""
    metrics = instruments()
    published = app.extensions[_EXTENSION]

    def transition(_old: State, new: State) -> None:
        for candidate in State:
            metrics.breaker_state.labels(candidate.value).set(1 if candidate is new else 0)
        published["breaker_state"] = (os.getpid(), new)

    with app.app_context():
        breaker().add_listener(transition)
