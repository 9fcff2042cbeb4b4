"""The settings the flows need, as one immutable object made once per app.

`config.py` parses and checks the environment; the factory turns the result into Flask's
`app.config` for the extensions, and into this object for the service's own code. Flows
and other services read `current()`, never `current_app.config`, so what each of them
depends on is written down here, and a test can hand a flow other values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import Flask, current_app

_EXTENSION = "authapp.settings"


@dataclass(frozen=True, slots=True)
class Settings:
    bcrypt_rounds: int
    password_min_length: int
    access_token_lifetime: timedelta
    refresh_token_lifetime: timedelta
    session_lifetime: timedelta
    refresh_reuse_interval: timedelta
    session_max_per_user: int
    login_max_failures: int
    login_failure_window: int  # seconds
    ratelimit_key_prefix: str
    # Derives each refresh token's successor and its access token's `jti` (auth.tokens).
    token_derivation_key: bytes
    # Email (authapp/mail, docs/email.md)
    mail_url: str
    mail_from: str
    frontend_url: str
    password_reset_url: str
    email_verify_url: str
    email_verification: str  # off | optional | required
    password_reset_token_lifetime: timedelta
    email_token_lifetime: timedelta
    mail_rate_limit: str
    mail_templates_dir: str | None
    mail_timeout: int  # seconds, each step of an SMTP conversation
    mail_give_up_after: timedelta
    # JWT_PREVIOUS_SECRET_KEYS: chains begun before JWT_SECRET_KEY changed (auth.tokens).
    previous_token_derivation_keys: tuple[bytes, ...]
    token_issuer: str
    token_audience: str
    mfa_issuer: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        return cls(
            bcrypt_rounds=config["BCRYPT_ROUNDS"],
            password_min_length=config["PASSWORD_MIN_LENGTH"],
            access_token_lifetime=config["JWT_ACCESS_TOKEN_EXPIRES"],
            refresh_token_lifetime=config["JWT_REFRESH_TOKEN_EXPIRES"],
            session_lifetime=timedelta(days=config["SESSION_MAX_LIFETIME_DAYS"]),
            refresh_reuse_interval=timedelta(seconds=config["REFRESH_TOKEN_REUSE_INTERVAL"]),
            session_max_per_user=config["SESSION_MAX_PER_USER"],
            login_max_failures=config["LOGIN_MAX_FAILURES"],
            login_failure_window=config["LOGIN_FAILURE_WINDOW"],
            ratelimit_key_prefix=config.get("RATELIMIT_KEY_PREFIX") or "",
            token_derivation_key=config["JWT_SECRET_KEY"].encode(),
            mail_url=config["MAIL_URL"],
            mail_from=config["MAIL_FROM"],
            frontend_url=config["FRONTEND_URL"],
            password_reset_url=config["PASSWORD_RESET_URL"],
            email_verify_url=config["EMAIL_VERIFY_URL"],
            email_verification=config["EMAIL_VERIFICATION"],
            password_reset_token_lifetime=timedelta(minutes=config["PASSWORD_RESET_TOKEN_MINUTES"]),
            email_token_lifetime=timedelta(hours=config["EMAIL_TOKEN_HOURS"]),
            mail_rate_limit=config["MAIL_RATE_LIMIT"],
            mail_templates_dir=config["MAIL_TEMPLATES_DIR"],
            mail_timeout=config["MAIL_TIMEOUT"],
            mail_give_up_after=timedelta(hours=config["MAIL_GIVE_UP_HOURS"]),
            previous_token_derivation_keys=tuple(s.encode() for s in config.get("JWT_PREVIOUS_SECRET_KEYS", [])),
            token_issuer=config["JWT_ISSUER"],
            token_audience=config["JWT_AUDIENCE"],
            mfa_issuer=config["MFA_ISSUER"],
        )

    def __repr__(self) -> str:  # never shows the derivation key
        return f"<Settings bcrypt_rounds={self.bcrypt_rounds}>"  # nor MAIL_URL's password


def current() -> Settings:
    """The settings of the app that is handling this request or command."""
    return current_app.extensions[_EXTENSION]


def init_app(app: Flask) -> None:
    app.extensions[_EXTENSION] = Settings.from_config(app.config)
