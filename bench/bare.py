"""The benchmark's reference: a bare Flask route returning {}, served by the same uwsgi.ini
(bench.py starts it with `--module bench.bare:app`)."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return {}
