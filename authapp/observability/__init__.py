"""Request ids, timing, JSON logs and Prometheus metrics."""

from flask import Flask

from . import logs, metrics, requests


def init_app(app: Flask) -> None:
    logs.configure(app.config["LOG_LEVEL"])
    requests.init_app(app)
    metrics.init_app(app)
