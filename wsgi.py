"""WSGI entry point: `uwsgi --ini uwsgi.ini` (module = wsgi:app) or `flask --app wsgi run`."""

import sys

from authapp import create_app
from config import ConfigError

# uWSGI's exit status for "the app failed to load": with need-app and lazy-apps
# (uwsgi.ini) the master then stops the whole instance. Any other status makes it
# respawn the worker, which fails again, forever.
UWSGI_FAILED_APP_CODE = 22

try:
    app = create_app()
except ConfigError as exc:
    sys.stderr.write(f"authapp: configuration error: {exc}\n")
    try:
        import uwsgi  # noqa: F401  # importable only inside uWSGI
    except ImportError:
        sys.exit(1)
    sys.exit(UWSGI_FAILED_APP_CODE)
