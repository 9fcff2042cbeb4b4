"""WSGI entry point: `uwsgi --ini uwsgi.ini` (module = wsgi:app) or `flask --app wsgi run`."""

import gc
import os
import sys

from authapp import create_app
from authapp.auth.keys import require_signing_key
from config import ConfigError

# uWSGI's exit status for "the app failed to load": with need-app and lazy-apps
# (uwsgi.ini) the master then stops the whole instance. Any other status makes it
# respawn the worker, which fails again, forever.
UWSGI_FAILED_APP_CODE = 22

try:
    app = create_app()
    # The servers' start (uWSGI, gunicorn...), not `flask --app wsgi keys generate` and the
    # other commands, which must run before any key exists.
    if os.environ.get("FLASK_RUN_FROM_CLI") != "true":
        require_signing_key(app)
    # What the app's start made (modules, the app, its schemas, SQLAlchemy's tables...) lives
    # as long as the process: moved out of the garbage collector's sight, so that a full
    # collection looks at what requests made since, not at all of that (about 130,000
    # objects: a full collection took 150 to 180 ms).
    gc.freeze()
except ConfigError as exc:
    sys.stderr.write(f"authapp: configuration error: {exc}\n")
    try:
        import uwsgi  # noqa: F401  # importable only inside uWSGI
    except ImportError:
        sys.exit(1)
    sys.exit(UWSGI_FAILED_APP_CODE)
