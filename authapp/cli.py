"""`flask` commands for operators."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register the operator commands (users, sessions) with the app's CLI."""
