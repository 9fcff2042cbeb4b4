"""Request ids, timing, JSON logs (and, later, metrics)."""

from flask import Flask

from . import logs, requests


def init_app(app: Flask) -> None:
    logs.configure(app.config["LOG_LEVEL"])
    requests.init_app(app)
