"""Every page the messages link to is one that the example frontend's server
(examples/frontend/serve.py) serves. The links are read from the messages the flows
queue, each kind of message once, with the default PASSWORD_RESET_URL and
EMAIL_VERIFY_URL: a path added to a template or to the link code, and not to serve.py,
fails here, with no list kept by hand."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PASSWORD, bearer
from sqlalchemy import select

from authapp.extensions import db
from authapp.mail import messages
from authapp.models import OutboxMessage

ROOT = Path(__file__).resolve().parents[1]
FRONTEND_DIR = ROOT / "examples" / "frontend"
SERVE = FRONTEND_DIR / "serve.py"
URL = re.compile(r"""https?://[^\s"'<>()]+""")
NEW_PASSWORD = "quartz-lantern-meadow-81"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def frontend() -> Iterator[str]:
    """`python3 examples/frontend/serve.py PORT`, as docs/frontend.md says to run it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(SERVE), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        started = server.stdout.readline()
        assert started.startswith("example frontend on "), started + server.stderr.read()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def settings(frontend):
    return {"FRONTEND_URL": frontend, "MAIL_FROM": "Example <no-reply@example.com>"}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def queued_messages(app) -> list[OutboxMessage]:
    with app.app_context():
        return list(db.session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def frontend_links(message: OutboxMessage, origin: str) -> set[str]:
    """The links to the frontend in both parts of a message (HTML entities undone)."""
    found = URL.findall(message.body_text or "") + URL.findall((message.body_html or "").replace("&amp;", "&"))
    return {link for link in found if link.startswith(origin + "/")}


def token_of(message: OutboxMessage) -> str:
    return re.search(r"#token=([A-Za-z0-9_-]+)", message.body_text or "").group(1)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_every_link_of_every_message_opens_a_page_the_example_server_serves(app, client, frontend):
    # Each kind of message, queued by its own flow (none is delivered: the outbox keeps the bodies).
    body = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    assert client.post("/auth/register", json=body).status_code == 201  # verify_email
    assert client.post("/auth/password-reset/request", json={"email": "alice@example.com"}).status_code == 202
    (reset_message,) = [m for m in queued_messages(app) if m.kind == messages.PASSWORD_RESET]
    reset = client.post("/auth/password-reset", json={"token": token_of(reset_message), "new_password": NEW_PASSWORD})
    assert reset.status_code == 200, reset.get_json()  # password_changed
    changed = client.post(
        "/auth/change-email",
        headers=bearer(reset.get_json()["access_token"]),
        json={"new_email": "alice.new@example.com", "current_password": NEW_PASSWORD},
    )
    assert changed.status_code == 202, changed.get_json()  # change_email and email_change_notice

    queued = queued_messages(app)
    assert {m.kind for m in queued} == set(messages.KINDS)
    links = {m.kind: frontend_links(m, frontend) for m in queued}
    assert all(links.values()), links  # every message links to the frontend
    index = (FRONTEND_DIR / "index.html").read_bytes()
    for link in sorted(set().union(*links.values())):
        parts = urllib.parse.urlsplit(link)
        # Nothing for a server to log: no query; a token only ever in the fragment.
        assert parts.query == "" and re.fullmatch(r"(token=[A-Za-z0-9_-]{43})?", parts.fragment), link
        status, page = get(f"{frontend}{parts.path}")  # what a browser asks for: the fragment stays behind
        assert (status, page == index) == (200, True), f"{parts.path} is not the app's page on serve.py"
    # The server does not answer every path with the page.
    assert get(f"{frontend}/no-such-page")[0] == 404
