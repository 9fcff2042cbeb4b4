"""Configuration: defaults, bad values that stop start-up with one line, the dev secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SECRET

from authapp import create_app
from config import ConfigError, build_flask_config, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults():
    settings = load_settings({})
    assert settings["ENVIRONMENT"] == "development"
    assert settings["ACCESS_TOKEN_EXPIRE_MINUTES"] == 30
    assert settings["REFRESH_TOKEN_EXPIRE_DAYS"] == 7
    assert settings["BCRYPT_ROUNDS"] == 12
    assert settings["PASSWORD_MIN_LENGTH"] == 8
    assert settings["CORS_ORIGINS"] == []
    assert settings["JWT_ALGORITHM"] == "HS256"
    assert settings["RATELIMIT_STORAGE_URI"] == "memory://"
    assert settings["SESSION_MAX_PER_USER"] == 50


@pytest.mark.parametrize(
    "name,value",
    [
        ("ACCESS_TOKEN_EXPIRE_MINUTES", "soon"),
        ("ACCESS_TOKEN_EXPIRE_MINUTES", "0"),
        ("BCRYPT_ROUNDS", "3"),
        ("BCRYPT_ROUNDS", "32"),
        ("ENVIRONMENT", "prod"),
        ("JWT_ALGORITHM", "none"),
        ("JWT_ALGORITHM", "RS512"),
        ("JWT_ALGORITHM", "PS256"),
        ("JWT_PREVIOUS_SECRET_KEYS", "short-old-secret"),
        ("JWT_KEYS_RELOAD_SECONDS", "0"),
        ("JWT_KEYS_RELOAD_SECONDS", "soon"),
        ("LOG_LEVEL", "LOUD"),
        ("CORS_ORIGINS", "*"),
        ("CORS_ORIGINS", "example.com"),
        ("DATABASE_URL", "mysql://x/y"),
        ("RATELIMIT_ENABLED", "maybe"),
        ("LOGIN_RATE_LIMIT", "lots"),
        ("PASSWORD_MIN_LENGTH", "4"),
        ("SESSION_MAX_PER_USER", "0"),
        ("SESSION_MAX_PER_USER", "many"),
    ],
)
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_secret_is_required_outside_development(environment):
    with pytest.raises(ConfigError, match="JWT_SECRET_KEY is required"):
        build_flask_config(load_settings({"ENVIRONMENT": environment}))


def test_short_secret_is_refused():
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        build_flask_config(load_settings({"ENVIRONMENT": "production", "JWT_SECRET_KEY": "short"}))
    with pytest.raises(ConfigError, match="at least 64 bytes"):
        build_flask_config(load_settings({"JWT_SECRET_KEY": "x" * 40, "JWT_ALGORITHM": "HS512"}))


def test_development_without_secret_gets_a_random_key_and_a_warning(tmp_path, capsys):
    app = create_app({"ENVIRONMENT": "development", "DATABASE_URL": f"sqlite:///{tmp_path}/d.db"})
    other = create_app({"ENVIRONMENT": "development", "DATABASE_URL": f"sqlite:///{tmp_path}/d.db"})
    assert len(app.config["JWT_SECRET_KEY"]) >= 64
    assert app.config["JWT_SECRET_KEY"] != other.config["JWT_SECRET_KEY"]
    assert "tokens die with this process" in capsys.readouterr().err


def test_postgres_urls_use_psycopg2():
    assert load_settings({"DATABASE_URL": "postgres://u@h/db"})["DATABASE_URL"] == "postgresql+psycopg2://u@h/db"


def test_wsgi_exits_with_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "ENVIRONMENT", "BCRYPT"))}
    env.update(ENVIRONMENT="production", JWT_SECRET_KEY=SECRET, BCRYPT_ROUNDS="many")
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "authapp: configuration error: BCRYPT_ROUNDS must be an integer, got 'many'"
    ]


def test_wsgi_leaves_what_the_start_made_out_of_the_collectors_sight(tmp_path):
    """The objects of the app's start are frozen (gc.freeze): a full collection under load
    looks only at what requests made since."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "ENVIRONMENT", "BCRYPT", "DATABASE"))}
    env.update(ENVIRONMENT="development", DATABASE_URL=f"sqlite:///{tmp_path}/w.db", PYTHONPATH=str(ROOT))
    probe = "import gc, wsgi; print(gc.get_freeze_count(), len(gc.get_objects()))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    frozen, still_seen = map(int, result.stdout.split())
    assert frozen > 50_000 and still_seen < frozen // 10, (frozen, still_seen)


# -- Resilience settings --------------------------------------------------------------------


def test_resilience_defaults():
    settings = load_settings({})
    assert settings["CIRCUIT_BREAKER_PROBE_INTERVAL_MS"] == 1000
    assert settings["DATABASE_IDLE_TIMEOUT"] == 60
    assert settings["RATELIMIT_STORAGE_TIMEOUT_MS"] == 100
    assert settings["MIGRATION_DATABASE_URL"] is None


@pytest.mark.parametrize(
    "name,value",
    [
        ("CIRCUIT_BREAKER_PROBE_INTERVAL_MS", "49"),
        ("CIRCUIT_BREAKER_PROBE_INTERVAL_MS", "1s"),
        ("DATABASE_IDLE_TIMEOUT", "-1"),
        ("DATABASE_IDLE_TIMEOUT", "1.5"),
        ("RATELIMIT_STORAGE_TIMEOUT_MS", "0"),
        ("RATELIMIT_STORAGE_TIMEOUT_MS", "fast"),
        ("MIGRATION_DATABASE_URL", "mysql://x/y"),
    ],
)
def test_bad_resilience_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_migration_url_uses_psycopg2():
    settings = load_settings({"MIGRATION_DATABASE_URL": "postgres://u@h/db"})
    assert settings["MIGRATION_DATABASE_URL"] == "postgresql+psycopg2://u@h/db"


@pytest.mark.parametrize(
    "threads,cap,kept,overflow",
    [(None, 20, 5, 15), (2, 20, 2, 18), (8, 4, 4, 0), (1, 1, 1, 0)],
)
def test_the_pool_keeps_as_many_connections_as_the_worker_has_threads(threads, cap, kept, overflow):
    from config import engine_options

    settings = load_settings({"DATABASE_URL": "postgresql://u@h/db", "DATABASE_MAX_POOL_SIZE": str(cap)})
    options = engine_options(settings, threads)
    assert (options["pool_size"], options["max_overflow"]) == (kept, overflow)
    assert options["pool_use_lifo"] is True
    assert "options" not in options["connect_args"], "PgBouncer refuses a startup options parameter"


@pytest.mark.parametrize(
    ("opt", "threads"),
    [
        ({"threads": b"2"}, 2),
        ({"threads": [b"4", b"8"]}, 8),
        ({}, 1),
        ({"threads": b"0"}, 1),
        ({"threads": b"x"}, None),
    ],
)
def test_the_thread_count_is_read_from_uwsgi(monkeypatch, opt, threads):
    """uWSGI's `uwsgi` module exists only inside uWSGI: its options as uWSGI gives them
    (bytes; a list when an option is given twice, the last one wins)."""
    import types

    from config import worker_threads

    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(opt=opt))
    assert worker_threads() == threads
    settings = load_settings({"DATABASE_URL": "postgresql://u@h/db", "JWT_SECRET_KEY": SECRET})
    kept = build_flask_config(settings)["SQLALCHEMY_ENGINE_OPTIONS"]["pool_size"]
    assert kept == (threads or 5)


def test_redis_storage_gets_timeouts_and_memory_none():
    redis = build_flask_config(load_settings({"RATELIMIT_STORAGE_URI": "redis://h:6379", "JWT_SECRET_KEY": SECRET}))
    assert redis["RATELIMIT_STORAGE_OPTIONS"] == {"socket_timeout": 0.1, "socket_connect_timeout": 0.1}
    memory = build_flask_config(load_settings({"JWT_SECRET_KEY": SECRET}))
    assert memory["RATELIMIT_STORAGE_OPTIONS"] == {}


def test_signing_settings_defaults_and_values():
    settings = load_settings({})
    assert settings["JWT_PREVIOUS_SECRET_KEYS"] == []
    assert settings["JWT_KEYS_RELOAD_SECONDS"] == 60
    old = "o" * 32
    settings = load_settings({"JWT_ALGORITHM": "eddsa", "JWT_PREVIOUS_SECRET_KEYS": f" {old} ,, {'p' * 40}"})
    assert settings["JWT_ALGORITHM"] == "EdDSA"
    assert settings["JWT_PREVIOUS_SECRET_KEYS"] == [old, "p" * 40]
    for algorithm in ("RS256", "ES256", "HS384"):
        assert load_settings({"JWT_ALGORITHM": algorithm.lower()})["JWT_ALGORITHM"] == algorithm


def test_a_previous_secret_shorter_than_32_bytes_is_named_by_position():
    with pytest.raises(ConfigError, match="JWT_PREVIOUS_SECRET_KEYS: secret number 2 is shorter than 32 bytes"):
        load_settings({"JWT_PREVIOUS_SECRET_KEYS": f"{'o' * 32},tiny"})


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_asymmetric_algorithms_need_a_secret_even_in_development(algorithm):
    # It encrypts the private keys at rest: a random one would lose them at the next start.
    with pytest.raises(ConfigError, match=f"JWT_SECRET_KEY is required with JWT_ALGORITHM={algorithm}"):
        build_flask_config(load_settings({"ENVIRONMENT": "development", "JWT_ALGORITHM": algorithm}))
    config = build_flask_config(load_settings({"JWT_ALGORITHM": algorithm, "JWT_SECRET_KEY": SECRET}))
    assert config["JWT_DECODE_ALGORITHMS"] == [algorithm]
