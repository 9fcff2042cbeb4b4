"""JSON log lines through python-json-logger, each stamped with the request id."""

from __future__ import annotations

import logging
import re
import sys
from typing import IO

from flask import g, has_request_context, request
from pythonjsonlogger.orjson import OrjsonFormatter


class RequestContextFilter(logging.Filter):
    """Adds the current request id, and the client address, to every record logged during
    a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        in_request = has_request_context()
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id") if in_request else None
        if in_request and not hasattr(record, "client_addr"):
            record.client_addr = request.remote_addr
        return True


_HANDLER_NAME = "authapp-json"

# A last line of defence for "no secret in a log line": whatever a library puts into an
# exception message (PostgreSQL's "Failing row contains (...)" shows a whole row, hash
# included), these never reach the output.
# Each pattern comes with a literal that any match contains: most lines contain none, and
# looking for a literal costs far less than running the pattern.
_REDACTIONS = (
    ("$2", re.compile(r"\$2[abxy]\$\d\d\$[./A-Za-z0-9]{53}"), "[redacted bcrypt hash]"),
    ("eyJ", re.compile(r"eyJ[\w-]*\.eyJ[\w-]*\.[\w-]*"), "[redacted token]"),
    (
        "Failing row contains",
        re.compile(r"Failing row contains \((?:[^()]|\([^()]*\))*\)"),
        "Failing row contains ([redacted])",
    ),
    ("Key (", re.compile(r"(Key \((?:[^()]|\([^()]*\))*\))=\((?:[^()]|\([^()]*\))*\)"), r"\1=([redacted])"),
)


class RedactingJsonFormatter(OrjsonFormatter):
    """JSON lines (python-json-logger's orjson encoder: a request's line is on the hot
    path) with hashes, tokens and database row values removed from every field."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for literal, pattern, replacement in _REDACTIONS:
            if literal in text:
                text = pattern.sub(replacement, text)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (test runners swap it)."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


# Our own loggers, and those of libraries whose messages an operator needs to see.
LOGGERS = ("authapp", "flask-limiter")


def configure(level: str) -> None:
    """Send our loggers to stderr as JSON lines; safe to call once per app."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
            handler = make_handler(None)
            handler.set_name(_HANDLER_NAME)
            logger.addHandler(handler)


def make_handler(stream: IO[str] | None) -> logging.Handler:
    """A handler writing one JSON object a line to `stream` (stderr when None)."""
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(
        RedactingJsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )
    )
    handler.addFilter(RequestContextFilter())
    return handler
