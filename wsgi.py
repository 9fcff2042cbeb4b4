"""WSGI entry point: `uwsgi --ini uwsgi.ini` (module = wsgi:app) or `flask --app wsgi run`."""

import sys

from authapp import create_app
from config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"authapp: configuration error: {exc}")
