"""authapp: a Flask authentication service (register, login, JWT sessions, health)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from config import build_flask_config, load_settings

from . import cli, database, errors, health, mail, openapi, ratelimit, settings, speedups, startup
from .auth import jwks, keys, routes, tokens
from .extensions import cors, db, jwt, migrate
from .observability import logs, metrics, requests
from .version import __version__

__all__ = ["create_app", "__version__"]

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app from the environment, or from `config` (settings by CONTRACT.md name)."""
    app = Flask(__name__, instance_relative_config=True)
    configure(app, config)
    register_extensions(app)
    register_blueprints(app)
    register_error_handlers(app)
    register_commands(app)
    register_middleware(app)
    speedups.install(app, app.config["SPEEDUPS"])
    startup.init_app(app)
    return app


def configure(app: Flask, config: Mapping[str, Any] | None) -> None:
    """Parse and check the settings (ConfigError names a bad one), then set up logging."""
    parsed = load_settings(config) if config is not None else load_settings()
    app.config.update(build_flask_config(parsed))
    if config is not None:  # extra Flask keys a test may pass alongside the settings
        app.config.update({k: v for k, v in config.items() if k not in parsed})
    if not app.config["SQLALCHEMY_DATABASE_URI"]:
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{app.instance_path}/authapp.db"
    settings.init_app(app)
    logs.configure(app.config["LOG_LEVEL"])


def register_extensions(app: Flask) -> None:
    # The database first: it makes the circuit breaker, which the metrics follow.
    database.init_app(app)
    metrics.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR, render_as_batch=True)
    jwt.init_app(app)
    keys.init_app(app, jwt)
    tokens.init_app(jwt)
    ratelimit.init_app(app)
    mail.init_app(app)
    if app.config["CORS_ORIGINS"]:
        cors.init_app(
            app,
            origins=app.config["CORS_ORIGINS"],
            supports_credentials=True,
            expose_headers=["X-Request-ID", "Retry-After", "WWW-Authenticate"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            max_age=600,
        )


def register_blueprints(app: Flask) -> None:
    api = openapi.Api()
    openapi.init_app(app, api)
    api.register_blueprint(routes.blp)
    api.register_blueprint(jwks.blp)
    api.register_blueprint(health.blp)
    api.register_blueprint(metrics.blp)


def register_error_handlers(app: Flask) -> None:
    errors.init_app(app)


def register_middleware(app: Flask) -> None:
    """The WSGI middleware around the app, outermost last.

    The request observer (request id, security headers, metrics, the request's log line)
    wraps everything, the body reader (`bodies.ChunkedBodies`, installed with the
    blueprints) included: a request refused anywhere inside still has its id, its headers
    and its line. It replaces the request hooks these were. The app's one request hook of
    its own is `openapi.check_body` (413 and 415 for a body), a before-request hook that
    `openapi.init_app` registers in `register_blueprints`, beside the body reader it
    relies on; Flask-Limiter's and Flask-CORS's are the extensions' own.
    """
    requests.init_app(app)


def register_commands(app: Flask) -> None:
    cli.init_app(app)
