"""authapp: a Flask authentication service (register, login, JWT sessions, health)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from config import build_flask_config, load_settings

from . import cli, database, errors, health, observability, openapi, ratelimit, security
from .auth import jwks, keys, routes, tokens
from .extensions import cors, db, jwt, migrate
from .version import __version__

__all__ = ["AuthApp", "create_app", "__version__"]

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


class AuthApp(Flask):
    """Flask, remembering which views and hooks are plain functions.

    Flask passes every view and request hook through `ensure_sync` on every request, which
    asks `inspect.iscoroutinefunction` each time: nine times for a GET /health/live, a
    measurable part of a cheap request. Flask documents this method as the one to override.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_callables: dict[Any, Any] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._sync_callables[func]
        except KeyError:
            wrapped = super().ensure_sync(func)
            if len(self._sync_callables) < 1024:  # views and hooks: a fixed set
                self._sync_callables[func] = wrapped
            return wrapped
        except TypeError:  # an unhashable callable
            return super().ensure_sync(func)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app from the environment, or from `config` (settings by CONTRACT.md name)."""

    app = AuthApp(__name__, instance_relative_config=True)
    settings = load_settings(config) if config is not None else load_settings()
    app.config.update(build_flask_config(settings))
    if config is not None:  # extra Flask keys a test may pass alongside the settings
        app.config.update({k: v for k, v in config.items() if k not in settings})
    if not app.config["SQLALCHEMY_DATABASE_URI"]:
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{app.instance_path}/authapp.db"

    register_observability(app)
    register_extensions(app)
    register_blueprints(app)
    register_error_handlers(app)
    register_hooks(app)
    register_commands(app)
    warn_if_ephemeral_secret(app)
    return app


def register_observability(app: Flask) -> None:

    observability.init_app(app)


def register_extensions(app: Flask) -> None:

    database.init_app(app)
    observability.metrics.watch_breaker(app)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR, render_as_batch=True)
    jwt.init_app(app)
    keys.init_app(app, jwt)
    tokens.init_app(jwt)
    ratelimit.init_app(app)
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
    api.register_blueprint(observability.metrics.blp)


def register_error_handlers(app: Flask) -> None:

    errors.init_app(app)


def register_hooks(app: Flask) -> None:
    security.init_app(app)


def register_commands(app: Flask) -> None:

    cli.init_app(app)


def warn_if_ephemeral_secret(app: Flask) -> None:
    if app.config["JWT_SECRET_GENERATED"] and not app.testing:
        logging.getLogger("authapp").warning(
            "JWT_SECRET_KEY is not set: using a random key; tokens die with this process",
            extra={"event": "ephemeral_jwt_secret"},
        )
