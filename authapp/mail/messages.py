"""The messages the service sends, rendered from Jinja templates: for each kind a subject
line (`KIND.subject.txt`), a plain-text part (`KIND.txt`) and an HTML part (`KIND.html`),
in authapp/templates/mail/; a file of the same name in MAIL_TEMPLATES_DIR replaces the
shipped one. The HTML part is autoescaped; the subject is one line, whatever the template
or a user value puts in it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from .. import settings

# The kinds of message, each a template name and a per-recipient budget (MAIL_RATE_LIMIT).
PASSWORD_RESET = "password_reset"
PASSWORD_CHANGED = "password_changed"
VERIFY_EMAIL = "verify_email"
CHANGE_EMAIL = "change_email"
EMAIL_CHANGE_NOTICE = "email_change_notice"
KINDS = (PASSWORD_RESET, PASSWORD_CHANGED, VERIFY_EMAIL, CHANGE_EMAIL, EMAIL_CHANGE_NOTICE)

SHIPPED_TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "mail"
_EXTENSION = "authapp.mail.templates"


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


def environment(templates_dir: str | None) -> Environment:
    loaders = [FileSystemLoader(templates_dir)] if templates_dir else []
    loaders.append(FileSystemLoader(str(SHIPPED_TEMPLATES)))
    return Environment(
        loader=ChoiceLoader(loaders),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )


def duration(value: timedelta) -> str:
    """'60 minutes', '24 hours', '1 day' ... as a message says it."""
    minutes = int(value.total_seconds() // 60)
    if minutes % (24 * 60) == 0 and minutes >= 48 * 60:
        return f"{minutes // (24 * 60)} days"
    if minutes % 60 == 0:
        hours = minutes // 60
        return "1 hour" if hours == 1 else f"{hours} hours"
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


def render(kind: str, **context: Any) -> Rendered:
    """The three parts of a message of `kind` for `context` (see docs/email.md)."""
    env: Environment = current_app.extensions[_EXTENSION]
    subject = env.get_template(f"{kind}.subject.txt").render(**context)
    return Rendered(
        # One line: a header can never be split by a template or by a value in it.
        subject=" ".join(subject.split()),
        text=env.get_template(f"{kind}.txt").render(**context),
        html=env.get_template(f"{kind}.html").render(**context),
    )


def link(base: str, token: str) -> str:
    """The contract's link: the token in the fragment, which browsers never send to a server."""
    return f"{base}#token={token}"


def password_reset_link(token: str) -> str:
    return link(settings.current().password_reset_url, token)


def email_verify_link(token: str) -> str:
    return link(settings.current().email_verify_url, token)


def init_app(app: Flask) -> None:
    app.extensions[_EXTENSION] = environment(app.config.get("MAIL_TEMPLATES_DIR"))
