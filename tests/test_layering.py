"""The layering rules of docs/architecture.md, read from the code itself.

Only views, request hooks and extension set-up may read the request or Flask's config;
flows and services get what they need as arguments (the auth context, the client) or from
`authapp.settings`. And `g` holds only the request id, its start time and the auth context.
"""

from __future__ import annotations

import ast
from pathlib import Path

from flask import g
from helpers import PASSWORD, bearer

PACKAGE = Path(__file__).resolve().parent.parent / "authapp"

# Views (the HTTP and CLI entry points), request hooks, and extension set-up.
MAY_READ_THE_REQUEST = {
    "addresses.py",  # Flask-Limiter's key function
    "auth/routes.py",
    "auth/jwks.py",
    "health.py",
    "openapi.py",
    "errors.py",
    "security.py",
    "observability/requests.py",
    "observability/logs.py",
    "observability/metrics.py",
}
MAY_READ_FLASK_CONFIG = {
    "__init__.py",
    "cli.py",
    "database.py",
    "errors.py",
    "extensions.py",
    "openapi.py",
    "ratelimit.py",
    "settings.py",
}


def offences(source: str) -> tuple[list[int], list[int]]:
    """Lines that read `flask.request`, and lines that read `current_app.config`."""
    tree = ast.parse(source)
    request_lines, config_lines = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "flask":
            if any(alias.name == "request" for alias in node.names):
                request_lines.append(node.lineno)
        elif isinstance(node, ast.Attribute):
            value = node.value
            if node.attr == "request" and isinstance(value, ast.Name) and value.id == "flask":
                request_lines.append(node.lineno)
            if node.attr == "config" and isinstance(value, ast.Name) and value.id == "current_app":
                config_lines.append(node.lineno)
    return request_lines, config_lines


def test_the_scan_finds_what_it_looks_for():
    source = "import flask\nfrom flask import current_app, request\nx = current_app.config['A']\ny = flask.request\n"
    assert offences(source) == ([2, 4], [3])
    assert offences("from flask import g\nx = app.config\n") == ([], [])


def test_only_views_hooks_and_setup_read_the_request_or_the_config():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        request_lines, config_lines = offences(path.read_text())
        if request_lines and name not in MAY_READ_THE_REQUEST:
            found.append(f"{name}:{request_lines[0]} reads flask.request")
        if config_lines and name not in MAY_READ_FLASK_CONFIG:
            found.append(f"{name}:{config_lines[0]} reads current_app.config")
    assert found == []


def test_g_holds_the_request_id_the_start_time_and_the_auth_context(app, client):
    """The request id is `g.request_id`, read from the environ (observability.requests);
    the start time lives in the request observer; so only the auth context is set on `g`."""
    seen = []

    @app.after_request
    def look(response):
        # Names of our own (the libraries' start with an underscore).
        seen.append(({name for name in vars(g) if not name.startswith("_")}, g.request_id))
        return response

    account = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    answers = [client.post("/auth/register", json=account)]
    answers.append(client.get("/auth/me", headers=bearer(answers[0].get_json()["access_token"])))
    answers.append(client.post("/auth/login", json={"email": "alice@example.com", "password": "wrong password here"}))
    assert [names for names, _ in seen] == [set(), {"auth"}, set()]
    assert [request_id for _, request_id in seen] == [answer.headers["X-Request-ID"] for answer in answers]
