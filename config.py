"""Configuration read from the environment (and `.env`), checked once at start-up.

Every setting of CONTRACT.md is parsed here. A bad value raises ConfigError with one line
naming the variable; `wsgi.py` turns that into a clean exit. Secrets have no fallback
value: outside development and testing `JWT_SECRET_KEY` must be set.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from datetime import timedelta
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

ENVIRONMENTS = ("development", "staging", "production", "testing")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
# Signed with a key pair kept in the database (authapp/auth/keys.py); see docs/signing-keys.md.
ASYMMETRIC_ALGORITHMS = ("RS256", "ES256", "EdDSA")
JWT_ALGORITHMS = HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# RFC 7518 3.2: an HMAC key at least as long as the hash output. With a key pair the
# secret still derives the key that encrypts the private parts at rest.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64, "RS256": 32, "ES256": 32, "EdDSA": 32}
_RATE_LIMIT = re.compile(r"^\s*\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?\s*$", re.I)


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def _int(minimum: int, maximum: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum else f">= {minimum}"
            raise ConfigError(f"{name} must be {bound}, got {value}")
        return value

    return parse


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _algorithm(name: str, raw: str) -> str:
    by_upper = {algorithm.upper(): algorithm for algorithm in JWT_ALGORITHMS}
    value = by_upper.get(raw.strip().upper())
    if value is None:
        raise ConfigError(f"{name} must be one of {', '.join(JWT_ALGORITHMS)}, got {raw!r}")
    return value


def _secret_list(name: str, raw: str) -> list[str]:
    secrets_ = [part.strip() for part in raw.split(",") if part.strip()]
    for position, secret in enumerate(secrets_, start=1):
        if len(secret.encode()) < 32:
            raise ConfigError(f"{name}: secret number {position} is shorter than 32 bytes")
    return secrets_


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _rate_limit(name: str, raw: str) -> str:
    if not all(_RATE_LIMIT.match(part) for part in raw.split(";")):
        raise ConfigError(f"{name} must be a rate limit such as '30/minute', got {raw!r}")
    return raw.strip()


def _storage_uri(name: str, raw: str) -> str:
    uri = raw.strip()
    if not re.match(r"^(memory|redis|rediss|redis\+sentinel|redis\+cluster|memcached|mongodb)://", uri):
        raise ConfigError(f"{name} must be a limits storage URI such as memory:// or redis://host:6379, got {raw!r}")
    return uri


def _text(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{name} must not be empty")
    return raw.strip()


def _origins(name: str, raw: str) -> list[str]:
    origins = [o.strip().rstrip("/") for o in raw.split(",") if o.strip()]
    for origin in origins:
        if origin == "*" or not re.match(r"^https?://[^/\s]+$", origin):
            raise ConfigError(f"{name} must list origins like https://app.example.com, got {origin!r}")
    return origins


def _database_url(name: str, raw: str) -> str:
    url = raw.strip()
    # Heroku-style URLs name the dialect "postgres", which SQLAlchemy no longer accepts.
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the driver shipped is psycopg2.
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", url):
        raise ConfigError(f"{name} must be a sqlite:// or postgresql:// URL")
    return url


def _writable_directory(name: str, raw: str) -> str:
    path = raw.strip()
    if not path or not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} must be an existing directory this process can write to, got {raw!r}")
    return path


EMAIL_VERIFICATION_MODES = ("off", "optional", "required")
MAIL_SCHEMES = ("smtp", "smtp+starttls", "smtps")  # authapp/mail/transport.py


def _mail_url(name: str, raw: str) -> str:
    url = raw.strip()
    if url == "console:":
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name} must be console: or smtp://, smtp+starttls://, smtps://host[:port]") from None
    if parts.scheme not in MAIL_SCHEMES or not parts.hostname or (parts.path not in ("", "/")) or port == 0:
        raise ConfigError(f"{name} must be console: or smtp://, smtp+starttls://, smtps:// with a host, got a bad URL")
    return url


def _address(name: str, raw: str) -> str:
    value = raw.strip()
    _display, address = parseaddr(value)
    if "\r" in value or "\n" in value or not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", address or ""):
        raise ConfigError(f"{name} must be an email address such as 'authapp <no-reply@example.com>', got {raw!r}")
    return value


def _http_url(name: str, raw: str) -> str:
    url = raw.strip()
    if not re.match(r"^https?://[^/\s#?]+(/[^\s#]*)?$", url):
        raise ConfigError(f"{name} must be an http(s) URL without a fragment, got {raw!r}")
    return url


def _directory(name: str, raw: str) -> str:
    path = raw.strip()
    if not os.path.isdir(path):
        raise ConfigError(f"{name} must be an existing directory, got {raw!r}")
    return path


# authapp/speedups.py
SPEEDUP_NAMES = (
    "sync_callables",
    "lean_log_records",
    "pyjwt_segments",
    "limiter_hooks",
    "hmac_keys",
    "verified_tokens",
    "app_hooks",
)


def _speedups(name: str, raw: str) -> tuple[str, ...]:
    value = raw.strip().lower()
    if value == "all":
        return SPEEDUP_NAMES
    if value == "none":
        return ()
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [n for n in names if n not in SPEEDUP_NAMES]
    if unknown or not names:
        raise ConfigError(f"{name} must be all, none, or some of {', '.join(SPEEDUP_NAMES)}, got {raw!r}")
    return names


# variable -> (parser, default). A default of None means "not set".
SETTINGS: dict[str, tuple[Callable[[str, str], Any], str | None]] = {
    "ENVIRONMENT": (_choice(ENVIRONMENTS), "development"),
    "DATABASE_URL": (_database_url, None),
    # `flask db upgrade` connects here when set (a direct URL beside a pooler's).
    "MIGRATION_DATABASE_URL": (_database_url, None),
    "JWT_SECRET_KEY": (_text, None),
    "JWT_ALGORITHM": (_algorithm, "HS256"),
    # Older values of JWT_SECRET_KEY, newest first: they still verify HS* tokens, follow
    # refresh-token chains and decrypt stored signing keys (docs/signing-keys.md).
    "JWT_PREVIOUS_SECRET_KEYS": (_secret_list, ""),
    # How often each process re-reads the signing keys from the database.
    "JWT_KEYS_RELOAD_SECONDS": (_int(1, 3600), "60"),
    "JWT_ISSUER": (_text, "authapp"),
    "JWT_AUDIENCE": (_text, "authapp"),
    # The name an authenticator app shows beside a TOTP account (docs/mfa.md).
    "MFA_ISSUER": (_text, "authapp"),
    "ACCESS_TOKEN_EXPIRE_MINUTES": (_int(1, 24 * 60), "30"),
    "REFRESH_TOKEN_EXPIRE_DAYS": (_int(1, 365), "7"),
    "SESSION_MAX_LIFETIME_DAYS": (_int(1, 3650), "30"),
    "REFRESH_TOKEN_REUSE_INTERVAL": (_int(0, 300), "10"),
    "SESSION_MAX_PER_USER": (_int(1, 10_000), "50"),
    "LOG_LEVEL": (_choice(LOG_LEVELS, upper=True), "INFO"),
    "DATABASE_MAX_POOL_SIZE": (_int(1, 1000), "20"),
    "DATABASE_CONNECT_TIMEOUT": (_int(1, 300), "5"),
    "DATABASE_STATEMENT_TIMEOUT_MS": (_int(0, 3_600_000), "5000"),
    # PostgreSQL closes a connection that sat idle this long (idle_session_timeout), so
    # that an idle worker gives its server slots back; 0 keeps them open.
    "DATABASE_IDLE_TIMEOUT": (_int(0, 86_400), "60"),
    "CIRCUIT_BREAKER_THRESHOLD": (_int(1, 1000), "5"),
    "CIRCUIT_BREAKER_TIMEOUT": (_int(1, 3600), "60"),
    "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS": (_int(1, 1000), "1"),
    # While the breaker is open, the database is checked in the background at growing
    # intervals, up to this one (and never more often than every 50 ms).
    "CIRCUIT_BREAKER_PROBE_INTERVAL_MS": (_int(50, 3_600_000), "1000"),
    "CORS_ORIGINS": (_origins, ""),
    "BCRYPT_ROUNDS": (_int(4, 31), "12"),
    "PASSWORD_MIN_LENGTH": (_int(8, 128), "8"),
    "RATELIMIT_ENABLED": (_bool, "true"),
    "RATELIMIT_STORAGE_URI": (_storage_uri, "memory://"),
    "RATELIMIT_KEY_PREFIX": (lambda name, raw: raw.strip(), ""),
    # Every call to the counters' Redis: connecting, and each command's answer.
    "RATELIMIT_STORAGE_TIMEOUT_MS": (_int(10, 60_000), "100"),
    "LOGIN_RATE_LIMIT": (_rate_limit, "30/minute"),
    "REGISTER_RATE_LIMIT": (_rate_limit, "10/minute"),
    "REFRESH_RATE_LIMIT": (_rate_limit, "60/minute"),
    "LOGIN_MAX_FAILURES": (_int(1, 10_000), "10"),
    "LOGIN_FAILURE_WINDOW": (_int(1, 86_400), "900"),
    # Read by prometheus_client itself from the environment; checked here so that a bad
    # value stops start-up with one line (observability/metrics.py).
    "PROMETHEUS_MULTIPROC_DIR": (_writable_directory, None),
    "SPEEDUPS": (_speedups, "all"),
    # Email (authapp/mail, docs/email.md). MAIL_URL, MAIL_FROM and FRONTEND_URL have
    # defaults only in development and testing (build_flask_config).
    "MAIL_URL": (_mail_url, None),
    "MAIL_FROM": (_address, None),
    "FRONTEND_URL": (_http_url, None),
    "PASSWORD_RESET_URL": (_http_url, None),
    "EMAIL_VERIFY_URL": (_http_url, None),
    "EMAIL_VERIFICATION": (_choice(EMAIL_VERIFICATION_MODES), "optional"),
    "PASSWORD_RESET_TOKEN_MINUTES": (_int(1, 24 * 60), "60"),
    "EMAIL_TOKEN_HOURS": (_int(1, 30 * 24), "24"),
    "MAIL_RATE_LIMIT": (_rate_limit, "3/hour"),
    "MAIL_REQUEST_RATE_LIMIT": (_rate_limit, "10/minute"),
    "MAIL_TEMPLATES_DIR": (_directory, None),
    "MAIL_TIMEOUT": (_int(1, 300), "10"),
    "MAIL_GIVE_UP_HOURS": (_int(1, 30 * 24), "24"),
}

# What development and testing use when the email settings are not set.
DEVELOPMENT_MAIL = {
    "MAIL_URL": "console:",
    "MAIL_FROM": "authapp <no-reply@localhost.localdomain>",
    "FRONTEND_URL": "http://127.0.0.1:8000",
}


# Connections older than this are replaced (authapp.database tests the ones that waited
# in the pool before use, and catches the dead ones sooner).
POOL_RECYCLE_SECONDS = 1800
# Connections a pool keeps open when the process's thread count is unknown (not uWSGI).
DEFAULT_POOL_SIZE = 5


def worker_threads() -> int | None:
    """The threads of this uWSGI worker (uwsgi.ini `threads`), None outside uWSGI."""
    try:
        import uwsgi  # importable only inside uWSGI
    except ImportError:
        return None
    raw = uwsgi.opt.get("threads", b"1")
    raw = raw[-1] if isinstance(raw, list) else raw
    try:
        return max(1, int(raw.decode() if isinstance(raw, bytes) else raw))
    except ValueError:
        return None


def engine_options(settings: Mapping[str, Any], threads: int | None = None) -> dict[str, Any]:
    """SQLAlchemy engine options for PostgreSQL: at most DATABASE_MAX_POOL_SIZE connections,
    of which a worker keeps open only as many as it has threads (the rest close when they
    come back), tested before use when they sat idle, with a connect timeout. SQLite (one
    file, no network) keeps Flask-SQLAlchemy's defaults.

    No startup `options` parameter (PgBouncer refuses it): the statement timeout is set
    per transaction and the idle timeout per connection (authapp.database)."""
    # SQL parameters never reach an error message or a log line: they hold password hashes.
    common = {"hide_parameters": True}
    url = settings.get("DATABASE_URL")
    if not url or not url.startswith("postgresql"):
        return common
    # These replace the same parameters in DATABASE_URL's query string, so that the
    # client-side deadlines (authapp.database) and libpq's agree.
    connect_args = {
        "connect_timeout": settings["DATABASE_CONNECT_TIMEOUT"],
        "application_name": "authapp",
    }
    cap = settings["DATABASE_MAX_POOL_SIZE"]
    # A thread uses one connection at a time: more idle ones only hold server slots.
    kept = min(cap, threads or DEFAULT_POOL_SIZE)
    return {
        **common,
        "pool_size": kept,
        "max_overflow": cap - kept,
        # Waiting for a free pooled connection is bounded like waiting for a new one.
        "pool_timeout": settings["DATABASE_CONNECT_TIMEOUT"],
        "pool_recycle": POOL_RECYCLE_SECONDS,
        # The most recently used connection first: the others stay idle and are closed
        # by the server after DATABASE_IDLE_TIMEOUT.
        "pool_use_lifo": True,
        "connect_args": connect_args,
    }


def storage_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Options of the counters' storage (Flask-Limiter and the lockout): a Redis that hangs
    costs a call RATELIMIT_STORAGE_TIMEOUT_MS at most, instead of blocking the request."""
    if not settings["RATELIMIT_STORAGE_URI"].startswith(("redis://", "rediss://")):
        return {}
    timeout = settings["RATELIMIT_STORAGE_TIMEOUT_MS"] / 1000
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def load_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse every setting from `environ` (the process environment and `.env` by default)."""
    if environ is None:
        from dotenv import load_dotenv

        load_dotenv(override=False)
        environ = os.environ
    settings: dict[str, Any] = {}
    for name, (parse, default) in SETTINGS.items():
        raw = environ.get(name)
        if raw is None or (raw == "" and default is not None):
            raw = default
        settings[name] = None if raw is None else parse(name, raw)
    return settings


def mail_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The email settings with their development defaults, and the link URLs derived from
    FRONTEND_URL; staging and production must set the three that have no safe default."""
    env = settings["ENVIRONMENT"]
    if settings.get("MAIL_URL") == "console:" and env not in ("development", "testing"):
        raise ConfigError(f"MAIL_URL=console: is for development and testing only, not ENVIRONMENT={env}")
    resolved = {}
    for name, default in DEVELOPMENT_MAIL.items():
        value = settings.get(name)
        if value is None:
            if env not in ("development", "testing"):
                raise ConfigError(f"{name} is required when ENVIRONMENT={env}")
            value = default
        resolved[name] = value
    frontend = resolved["FRONTEND_URL"].rstrip("/")
    resolved["FRONTEND_URL"] = frontend
    resolved["PASSWORD_RESET_URL"] = settings.get("PASSWORD_RESET_URL") or f"{frontend}/reset-password"
    resolved["EMAIL_VERIFY_URL"] = settings.get("EMAIL_VERIFY_URL") or f"{frontend}/verify-email"
    return resolved


def build_flask_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Turn parsed settings into the Flask and extension configuration keys."""
    env = settings["ENVIRONMENT"]
    secret = settings.get("JWT_SECRET_KEY")
    generated = False
    if secret is None:
        if env not in ("development", "testing"):
            raise ConfigError(f"JWT_SECRET_KEY is required when ENVIRONMENT={env}")
        secret, generated = secrets.token_urlsafe(64), True
    algorithm = settings["JWT_ALGORITHM"]
    if generated and algorithm in ASYMMETRIC_ALGORITHMS and env != "testing":
        # The secret encrypts the private keys in the database: a random one would leave
        # them unreadable after a restart.
        raise ConfigError(f"JWT_SECRET_KEY is required with JWT_ALGORITHM={algorithm}")
    minimum = MIN_SECRET_BYTES[algorithm]
    if not generated and len(secret.encode()) < minimum:
        raise ConfigError(f"JWT_SECRET_KEY must be at least {minimum} bytes long for {algorithm}")
    return {
        **settings,
        **mail_config(settings),
        "TESTING": env == "testing",
        # No SECRET_KEY: the API keeps no cookie session, and without a key Flask does not
        # open one on every request.
        "JWT_SECRET_KEY": secret,
        "JWT_SECRET_GENERATED": generated,
        "JWT_ALGORITHM": algorithm,
        "JWT_DECODE_ALGORITHMS": [algorithm],
        "JWT_ENCODE_ISSUER": settings["JWT_ISSUER"],
        "JWT_DECODE_ISSUER": settings["JWT_ISSUER"],
        "JWT_ENCODE_AUDIENCE": settings["JWT_AUDIENCE"],
        "JWT_DECODE_AUDIENCE": settings["JWT_AUDIENCE"],
        "JWT_ACCESS_TOKEN_EXPIRES": timedelta(minutes=settings["ACCESS_TOKEN_EXPIRE_MINUTES"]),
        "JWT_REFRESH_TOKEN_EXPIRES": timedelta(days=settings["REFRESH_TOKEN_EXPIRE_DAYS"]),
        "JWT_TOKEN_LOCATION": ["headers"],
        "SQLALCHEMY_DATABASE_URI": settings.get("DATABASE_URL"),
        "SQLALCHEMY_ENGINE_OPTIONS": engine_options(settings, worker_threads()),
        "MAX_CONTENT_LENGTH": 64 * 1024,
        "RATELIMIT_HEADERS_ENABLED": False,
        "RATELIMIT_STORAGE_OPTIONS": storage_options(settings),
        # Tokens travel in the Authorization header only, so no CSRF claim is needed.
        "JWT_COOKIE_CSRF_PROTECT": False,
    }
