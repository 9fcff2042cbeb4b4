"""Email: messages rendered from templates (`messages`), written to the outbox in the
transaction of the change that causes them (`outbox`), and delivered from there by the
courier (`courier`, `flask mail courier`) over SMTP or to the console (`transport`)."""

from __future__ import annotations

from flask import Flask

from . import messages


def init_app(app: Flask) -> None:
    """Make the app's template environment (MAIL_TEMPLATES_DIR first, then the shipped
    templates)."""
    messages.init_app(app)
