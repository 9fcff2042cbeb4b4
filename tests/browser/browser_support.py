"""What the browser tests share besides fixtures: live servers, the static frontend site,
and small page helpers."""

from __future__ import annotations

import functools
import http.server
import ipaddress
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pyotp
from flask import Flask
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[2]
FRONTEND_DIR = ROOT / "examples" / "frontend"
LINK_PAGES = ("/reset-password", "/verify-email")  # as examples/frontend/serve.py serves them
TOTP_STEP = 30  # seconds: RFC 6238's time step, the contract's


def is_loopback(url: str) -> bool:
    """True for http(s) URLs on a loopback host; data:, blob: and about: never leave the page."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- Servers ----------------------------------------------------------------------------


@dataclass
class LiveServer:
    url: str
    received: list[tuple[str, str, str | None]]  # (method, path, Origin) of every request


@contextmanager
def serve(app: Flask, host: str = "127.0.0.1") -> Iterator[LiveServer]:
    """Serve a Flask app on a free port of a loopback `host`, a thread per request."""
    received: list[tuple[str, str, str | None]] = []
    wsgi_app = app.wsgi_app

    def recording(environ, start_response):
        received.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_ORIGIN")))
        return wsgi_app(environ, start_response)

    server = make_server(host, 0, recording, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LiveServer(f"http://{host}:{server.server_port}", received)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


class _FrontendHandler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, site: StaticSite, **kwargs) -> None:
        self.site = site
        super().__init__(*args, directory=str(FRONTEND_DIR), **kwargs)

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path in LINK_PAGES:
            # The pages the email links open are the one page, as any single-page host serves them.
            self.path = "/index.html"
        if urllib.parse.urlsplit(self.path).path == "/config.js" and self.site.api_url:
            # What a deployment writes into config.js: where the API is.
            body = f"window.AUTHAPP_CONFIG = {{ apiBaseUrl: {json.dumps(self.site.api_url)} }};\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        self.site.log.append(format % args)


@dataclass
class StaticSite:
    """examples/frontend served as static files, on its own origin; with `api_url` set, its
    config.js points the page there instead of at the shipped default."""

    host: str = "127.0.0.1"
    api_url: str = ""
    origin: str = ""
    log: list[str] = field(default_factory=list)

    @contextmanager
    def running(self) -> Iterator[StaticSite]:
        handler = functools.partial(_FrontendHandler, site=self)
        server = http.server.ThreadingHTTPServer((self.host, 0), handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.origin = f"http://{self.host}:{server.server_port}"
        try:
            yield self
        finally:
            server.shutdown()
            thread.join(timeout=10)
            server.server_close()


# -- The example page ---------------------------------------------------------------------

TOKEN_PATHS = ("/auth/register", "/auth/login", "/auth/refresh", "/auth/mfa/verify")

# Everywhere the page's origin could keep a token between two visits, or show one.
STORED = """async () => ({
  local: Object.entries(localStorage),
  session: Object.entries(sessionStorage),
  cookie: document.cookie,
  indexedDB: (await indexedDB.databases()).map((db) => db.name),
  caches: self.caches ? await caches.keys() : [],
  url: location.href,
  html: document.documentElement.outerHTML,
})"""


class FrontendPage:
    """examples/frontend in a browser tab, driven the way a person would: by its labelled
    controls, waiting for each action to finish."""

    def __init__(self, browser_page: Any, site: StaticSite) -> None:
        self.bp = browser_page
        self.page = browser_page.page
        self.site = site

    def open(self) -> FrontendPage:
        from playwright.sync_api import expect

        response = self.page.goto(self.site.origin + "/")
        assert response is not None and response.status == 200
        expect(self.page.locator("html")).to_have_attribute("data-ready", "true")
        return self

    def testid(self, name: str) -> Any:
        return self.page.get_by_test_id(name)

    def submit(self, form: str, **fields: str) -> None:
        for name, value in fields.items():
            self.testid(f"{form}-{name}").fill(value)
        self.testid(f"{form}-submit").click()
        expect_idle(self.page)

    def register(self, email: str, username: str, password: str) -> None:
        self.submit("register", email=email, username=username, password=password)

    def login(self, identifier: str, password: str) -> None:
        self.submit("login", identifier=identifier, password=password)

    def click(self, name: str) -> None:
        self.testid(name).click()
        expect_idle(self.page)

    def sessions(self) -> Any:
        return self.testid("sessions").get_by_test_id("session")

    def error(self) -> dict[str, Any]:
        """What the error box shows, or {} when it is hidden."""
        if not self.testid("error").is_visible():
            return {}
        request_id_line = self.testid("error-request-id-line")
        return {
            "detail": self.testid("error-detail").inner_text(),
            "code": self.testid("error-code").inner_text(),
            "request_id": self.testid("error-request-id").inner_text() if request_id_line.is_visible() else None,
            "fields": self.testid("error-fields").locator("li").all_inner_texts(),
        }

    def issued_tokens(self, api_url: str) -> list[str]:
        """Every access and refresh token the API gave this page."""
        tokens = []
        for request in self.bp.watch.requests:
            if request.method == "POST" and request.url in [api_url + path for path in TOKEN_PATHS]:
                response = request.response()
                body = response.json() if response is not None and response.status in (200, 201) else {}
                if "access_token" in body:  # not a login's MfaChallenge, which has no session yet
                    tokens += [body["access_token"], body["refresh_token"]]
        return tokens

    def assert_tokens_only_in_memory(self, tokens: list[str]) -> None:
        """No token in Web Storage, IndexedDB, Cache Storage, a cookie, the URL or the DOM,
        and no write to storage or document.cookie at all."""
        assert len(tokens) >= 2 and all(len(t) > 100 for t in tokens), tokens
        stored = self.page.evaluate(STORED)
        assert stored["local"] == [] and stored["session"] == [], stored
        assert stored["cookie"] == "" and stored["indexedDB"] == [] and stored["caches"] == [], stored
        for token in tokens:
            assert token not in stored["url"] and token not in stored["html"]
        state = self.page.context.storage_state()
        assert state["cookies"] == [] and all(origin["localStorage"] == [] for origin in state["origins"]), state
        assert self.bp.watch.reported("storage") == [] and self.bp.watch.reported("cookie") == []


def new_user() -> tuple[str, str]:
    """A username and an email address that no other test uses."""
    name = f"user{uuid.uuid4().hex[:8]}"
    return name, f"{name}@example.com"


def claims(token: str) -> dict:
    """A token's claims, unverified: what the page was given."""
    return jwt.decode(token, options={"verify_signature": False})


class Authenticator:
    """The user's authenticator app. The API accepts a code once, and a second code of the
    same time step would be the same code: so each code is of a step later than the last
    one's, waiting (until that step begins, no longer) when the clock has not got there."""

    def __init__(self, secret: str) -> None:
        self.totp = pyotp.TOTP(secret)  # SHA-1, 6 digits, 30 s: RFC 6238's defaults
        self.last_step: int | None = None

    def code(self) -> str:
        step = int(time.time()) // TOTP_STEP
        if self.last_step is not None and step <= self.last_step:
            step = self.last_step + 1
            while time.time() < step * TOTP_STEP:
                time.sleep(step * TOTP_STEP - time.time() + 0.01)
        self.last_step = step
        return self.totp.at(step * TOTP_STEP)

    def steps_since_last(self) -> int:
        assert self.last_step is not None
        return int(time.time()) // TOTP_STEP - self.last_step

    def wrong_code(self) -> str:
        """Six digits that no step the API accepts now (one step of drift either way) gives."""
        now = time.time()
        accepted = {self.totp.at(now + drift * TOTP_STEP) for drift in (-1, 0, 1)}
        return next(code for code in (f"{n:06d}" for n in range(0, 10**6, 111_111)) if code not in accepted)


def expect_idle(page: Any) -> None:
    """Wait until the example page has finished the action in progress."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("main")).to_have_attribute("aria-busy", "false")
