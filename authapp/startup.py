"""What runs once when the app starts to serve requests, and only then: `flask users
...` or `flask db upgrade` build the same app, and need none of it."""

from __future__ import annotations

import logging

import click
from flask import Flask

from . import schema_version

log = logging.getLogger("authapp")


def serving() -> bool:
    """True under a WSGI server (uWSGI, gunicorn: no click command runs) and for
    `flask run`; False for every other `flask` command."""
    context = click.get_current_context(silent=True)
    return context is None or context.info_name == "run"


class _NoRequestLines(logging.Filter):
    """Drops the development server's own line per request (werkzeug's
    `127.0.0.1 - - [date] "GET / HTTP/1.1" 200 -`): the app logs each request already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return " - - [" not in str(record.msg)


_no_request_lines = _NoRequestLines()


def quiet_development_server() -> None:
    """Keep werkzeug's start-up and error lines, not its request lines."""
    logger = logging.getLogger("werkzeug")
    if _no_request_lines not in logger.filters:
        logger.addFilter(_no_request_lines)


def init_app(app: Flask) -> None:
    """When serving: warn about a random JWT key, check the schema in the background."""
    if app.testing or not serving():
        return
    quiet_development_server()
    if app.config["JWT_SECRET_GENERATED"]:
        log.warning(
            "JWT_SECRET_KEY is not set: using a random key; tokens die with this process",
            extra={"event": "ephemeral_jwt_secret"},
        )
    schema_version.check_in_background(app)
