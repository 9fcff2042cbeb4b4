"""JSON log lines through python-json-logger, each stamped with the request id."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

from flask import g, has_request_context, request
from pythonjsonlogger.orjson import OrjsonFormatter


class RequestContextFilter(logging.Filter):
    """Adds the current request id, and the client address, to every record logged during
    a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if type(record) is RequestLineRecord:  # made with both fields
            return True
        in_request = has_request_context()
        if not hasattr(record, "request_id"):
            # requests.RequestGlobals has it; another app's `g` (a library's own logger) may not
            record.request_id = getattr(g, "request_id", None) if in_request else None
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

    # Set by make_handler, whose settings `format_request_line` writes out.
    request_lines_written_out = False

    def format(self, record: logging.LogRecord) -> str:
        if type(record) is RequestLineRecord and self.request_lines_written_out:
            text = self.format_request_line(record)
        else:
            text = super().format(record)
        return self.redacted(text)

    def request_line(self, name: str, fields: dict[str, Any], created: float) -> str:
        """The line `format` writes for a request's record of logger `name`, made at
        `created` (time.time()) with `fields`, without the record."""
        return self.redacted(self._request_line_text(name, fields, created))

    def redacted(self, text: str) -> str:
        for literal, pattern, replacement in _REDACTIONS:
            if literal in text:
                text = pattern.sub(replacement, text)
        return text

    def _request_line_text(self, name: str, fields: dict[str, Any], created: float) -> str:
        # REQUEST_LINE_FIELDS, written out: a loop over them cost more than the line's JSON.
        return self.serialize_log_record(
            {
                "level": "INFO",
                "logger": name,
                "message": "request",
                "event": fields["event"],
                "method": fields["method"],
                "path": fields["path"],
                "status": fields["status"],
                "duration_ms": fields["duration_ms"],
                "user_id": fields["user_id"],
                "client_addr": fields["client_addr"],
                "request_id": fields["request_id"],
                "timestamp": datetime.fromtimestamp(created, tz=UTC),
            }
        )

    def format_request_line(self, record: RequestLineRecord) -> str:
        """The request's line as `format` writes it with make_handler's settings (the same
        fields in the same order: tests/test_observability.py compares the two), without
        python-json-logger's walk over every attribute of the record."""
        record.message = record.msg
        return self._request_line_text(record.name, record.__dict__, record.created)


# The fields of a request's line after its message, in the order of the line.
REQUEST_LINE_FIELDS = ("event", "method", "path", "status", "duration_ms", "user_id", "client_addr", "request_id")


def _process_name() -> str:
    """The process's name as `logging.LogRecord` finds it."""
    mp = sys.modules.get("multiprocessing")
    if mp is not None:
        try:
            return str(mp.current_process().name)
        except Exception:  # as logging: multiprocessing not loaded yet
            pass
    return "MainProcess"


class RequestLineRecord(logging.LogRecord):
    """A request's log record: every attribute a `logging.LogRecord` has, set in fewer
    steps (no caller lookup: the line shows none), and the line's fields."""

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.__dict__.update(_REQUEST_RECORD_BASE)
        self.name = name
        created = time.time()
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]  # as LogRecord
        if logging.logThreads:
            import threading

            self.thread = threading.get_ident()
            self.threadName = threading.current_thread().name
        if logging.logMultiprocessing:
            self.processName = _process_name()
        if logging.logProcesses:
            self.process = os.getpid()
        self.__dict__.update(fields)


_REQUEST_RECORD_BASE: dict[str, Any] = {
    "msg": "request",
    "args": (),
    "levelname": "INFO",
    "levelno": logging.INFO,
    "pathname": __file__,
    "filename": os.path.basename(__file__),
    "module": "logs",
    "exc_info": None,
    "exc_text": None,
    "stack_info": None,
    "lineno": 0,
    "funcName": "log_request_line",
    "thread": None,
    "threadName": None,
    "processName": None,
    "process": None,
}


def log_request_line(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """Log a request's line (INFO, message "request") to `logger`'s handlers, as
    `logger.info("request", extra=fields)` would; `fields` holds REQUEST_LINE_FIELDS.

    With the handlers as `configure` sets them up (the line's one destination is our
    stderr handler), the line is written straight to it: the same text, under the same
    lock, without a record walked through the logging module's dispatch
    (tests/test_observability.py compares the two)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_stderr_handler(logger)
    if handler is None:
        logger.handle(RequestLineRecord(logger.name, fields))
        return
    try:
        text = handler.formatter.request_line(logger.name, fields, time.time())  # type: ignore[union-attr]
        with handler.lock:  # type: ignore[union-attr]
            handler.write(text)
    except RecursionError:  # as StreamHandler
        raise
    except Exception:  # as Handler.emit: reported on stderr, never the request's failure
        handler.handleError(RequestLineRecord(logger.name, fields))


def _sole_stderr_handler(logger: logging.Logger) -> _StderrHandler | None:
    """The handler `configure` gave `logger`'s parent, when it is the only place a record
    of `logger` would go and nothing on the way would filter or change it; else None."""
    parent = logger.parent
    if logger.handlers or logger.filters or not logger.propagate or logger.disabled or parent is None:
        return None
    if parent.filters or parent.propagate or parent.disabled or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    formatter = handler.formatter
    if (
        type(handler) is not _StderrHandler
        or handler.level > logging.INFO
        or type(formatter) is not RedactingJsonFormatter
        or not formatter.request_lines_written_out
        or len(handler.filters) != 1
        or type(handler.filters[0]) is not RequestContextFilter
    ):
        return None
    return handler


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (test runners swap it)."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """StreamHandler.emit, with `sys.stderr` looked up once and flushed directly: the
        handler's lock is held already (Handler.handle), which StreamHandler.flush takes
        again (a request's line is on the hot path)."""
        try:
            self.write(self.format(record))
        except RecursionError:  # as StreamHandler: see CPython issue 36272
            raise
        except Exception:
            self.handleError(record)

    def write(self, text: str) -> None:
        """One line of `text` to standard error, flushed (the caller holds the lock)."""
        stream = sys.stderr
        stream.write(text + self.terminator)
        stream.flush()


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
    formatter = RedactingJsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
    )
    formatter.request_lines_written_out = True
    handler.setFormatter(formatter)
    handler.addFilter(RequestContextFilter())
    return handler
