"""Request bodies sent with `Transfer-Encoding: chunked` (no Content-Length), read whole.

WSGI gives an app a body by its CONTENT_LENGTH; a server that de-chunks a body itself
marks its stream `wsgi.input_terminated` (Werkzeug's server, `flask run`, does). Such a
body is read here, at most one byte past MAX_CONTENT_LENGTH, and handed on with the
length it has, so that every later step (the 413 check, the JSON parser) sees an ordinary
body. Behind nginx, nginx de-chunks and counts the body itself (nginx.conf).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from flask import Flask


def _read_at_most(stream: Any, limit: int) -> bytes:
    parts, size = [], 0
    while size < limit:
        part = stream.read(min(65536, limit - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


class ChunkedBodies:
    """WSGI middleware: a terminated chunked body becomes a body with a Content-Length
    (over the limit: a length one past it, which the app answers 413)."""

    def __init__(self, wsgi_app: Any, limit: int) -> None:
        self.wsgi_app = wsgi_app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if (
            environ.get("wsgi.input_terminated")
            and not environ.get("CONTENT_LENGTH")
            and environ.get("HTTP_TRANSFER_ENCODING", "").strip().lower() == "chunked"
        ):
            body = _read_at_most(environ["wsgi.input"], self.limit + 1)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]
            del environ["wsgi.input_terminated"]
        return self.wsgi_app(environ, start_response)


def init_app(app: Flask) -> None:
    app.wsgi_app = ChunkedBodies(app.wsgi_app, app.config["MAX_CONTENT_LENGTH"])  # type: ignore[method-assign]
