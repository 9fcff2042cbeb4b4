"""Browser suite: headless Debian Chromium, driven by Playwright, against live servers.

The suite runs only when asked for (`make browser`, which sets BROWSER_TESTS=1); a plain
`make test` skips it with a reason, so a machine without Chromium still runs the rest.
When asked for, nothing may be skipped: a missing Chromium, a skipped test or a run with no
browser test fails the run.

Chromium is the Debian package at /usr/bin/chromium (CHROMIUM overrides it); no browser is
ever downloaded. Its network is cut off from everything but loopback: it is told to send
every request through a proxy on 127.0.0.1 that refuses them all (Chromium never proxies
loopback addresses, so the test servers are reached directly). Every test checks that its
pages asked for nothing outside loopback; what Chromium asked for by itself (update checks,
account look-ups, which the background-networking switches do not stop entirely) is refused
the same way and listed at the end of the run.

Screenshots go to tests/browser/output/<test>/ (BROWSER_OUTPUT_DIR overrides it); each
test starts with an empty folder of its own, and a failing test leaves failure.png there.
"""

from __future__ import annotations

import os
import re
import shutil
import socketserver
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from browser_support import FrontendPage, LiveServer, StaticSite, is_loopback, serve

OUTPUT_DIR = Path(os.environ.get("BROWSER_OUTPUT_DIR") or Path(__file__).resolve().parent / "output")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
REQUESTED = os.environ.get("BROWSER_TESTS", "").strip().lower() in ("1", "true", "yes", "required")
SKIP_REASON = "browser suite not requested: run `make browser` (BROWSER_TESTS=1, needs /usr/bin/chromium)"
# Without the background-networking switches Chromium keeps calling home, and this
# machine's closed network refuses it.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_skipped: list[str] = []
_ran: list[str] = []
_screenshots: list[Path] = []
_proxied: list[str] = []  # what Chromium asked the refusing proxy for, pages or not


# -- Opt-in, and no silent skip when opted in ---------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REQUESTED:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if item.get_closest_marker("browser") is None:
        return report
    setattr(item, f"rep_{report.when}", report)
    if REQUESTED and report.skipped:
        # BROWSER_TESTS=1 is a promise that the browser suite really ran.
        report.outcome = "failed"
        report.longrepr = f"browser test skipped although BROWSER_TESTS=1: {report.longrepr}"
    if report.when == "call" and report.passed:
        _ran.append(item.nodeid)
    if not REQUESTED and report.skipped:
        _skipped.append(item.nodeid)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    selected = any(item.get_closest_marker("browser") for item in session.items)
    if REQUESTED and selected and not _ran and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _skipped:
        terminalreporter.write_line(
            f"Browser suite SKIPPED ({len(_skipped)} tests): run `make browser` to drive headless Chromium", yellow=True
        )
    if REQUESTED and _proxied:
        hosts = sorted({line.split()[1].split("/")[2] if "://" in line else line.split()[1] for line in _proxied})
        terminalreporter.write_line(
            f"Chromium's own requests outside loopback, refused by the test proxy ({len(_proxied)}): {', '.join(hosts)}"
        )
    if REQUESTED and _screenshots:
        terminalreporter.write_line(f"Browser screenshots ({len(_screenshots)}) under {OUTPUT_DIR}:")
        for path in _screenshots:
            terminalreporter.write_line(f"  {path}")


# -- The network: loopback only ---------------------------------------------------------


class _RefusingProxyHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(4096).decode("latin-1").strip()
        if line:
            self.server.attempts.append(line)  # type: ignore[attr-defined]
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


class RefusingProxy(socketserver.ThreadingTCPServer):
    """Chromium's proxy: refuses every request and keeps its first line ("CONNECT host:443")."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RefusingProxyHandler)
        self.attempts = _proxied


@pytest.fixture(scope="session")
def refusing_proxy() -> Iterator[RefusingProxy]:
    proxy = RefusingProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser(refusing_proxy):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[*LAUNCH_ARGS, f"--proxy-server=http://127.0.0.1:{refusing_proxy.server_address[1]}"],
        )
        yield browser
        browser.close()


@pytest.fixture
def backend() -> str:
    """One database per browser test: the API suite covers both. PostgreSQL when the run has
    one (as production does), SQLite otherwise."""
    return "postgresql" if os.environ.get("TEST_DATABASE_URL", "").strip() else "sqlite"


@pytest.fixture
def frontend() -> Iterator[StaticSite]:
    with StaticSite().running() as site:
        yield site


@pytest.fixture
def api(app, frontend) -> Iterator[LiveServer]:
    """The app on a live server, and the frontend pointed at it."""
    with serve(app) as server:
        frontend.api_url = server.url
        yield server


@pytest.fixture
def site(browser_page, frontend, api) -> FrontendPage:
    """The example page, open in the browser and pointed at the live API (a module whose page
    needs more, such as a mail courier, overrides it)."""
    return FrontendPage(browser_page, frontend).open()


# -- Pages ------------------------------------------------------------------------------

# Runs in every page before its own scripts: reports CSP violations, and every write to
# Web Storage or document.cookie, to the test.
WATCH_SCRIPT = """
(() => {
  const report = (kind, detail) => { try { window.__authappWatch(kind, String(detail)); } catch (e) {} };
  document.addEventListener("securitypolicyviolation",
    (e) => report("csp", `${e.violatedDirective} blocked ${e.blockedURI || "(inline)"}`));
  const setItem = Storage.prototype.setItem;
  Storage.prototype.setItem = function (key, value) {
    report("storage", `setItem ${key}`);
    return setItem.call(this, key, value);
  };
  const cookie = Object.getOwnPropertyDescriptor(Document.prototype, "cookie");
  Object.defineProperty(Document.prototype, "cookie", {
    configurable: true,
    get() { return cookie.get.call(this); },
    set(value) { report("cookie", String(value).split("=")[0]); cookie.set.call(this, value); },
  });
})();
"""


@dataclass
class Watch:
    """Everything a page did that a test may want to check."""

    requests: list[Any] = field(default_factory=list)  # playwright Request objects
    failed: list[tuple[str, str]] = field(default_factory=list)  # (url, failure)
    console: list[tuple[str, str, str]] = field(default_factory=list)  # (type, text, source url)
    page_errors: list[str] = field(default_factory=list)
    reports: list[tuple[str, str]] = field(default_factory=list)  # (csp | storage | cookie, detail)

    def console_errors(self) -> list[str]:
        """Console errors, less the 404 of the /favicon.ico that Chromium asks for by itself."""
        return [text for kind, text, url in self.console if kind == "error" and not url.endswith("/favicon.ico")]

    def outside_loopback(self) -> list[str]:
        return [r.url for r in self.requests if not is_loopback(r.url)]

    def reported(self, kind: str) -> list[str]:
        return [detail for k, detail in self.reports if k == kind]

    def api_calls(self, base: str) -> list[tuple[str, str]]:
        """(method, path) of every request the page sent to `base`, in order."""
        return [(r.method, urllib.parse.urlsplit(r.url).path) for r in self.requests if r.url.startswith(base + "/")]


@dataclass
class BrowserPage:
    page: Any  # playwright.sync_api.Page
    context: Any
    watch: Watch
    out_dir: Path
    _shots: int = 0

    def screenshot(self, name: str) -> Path:
        """Save a full-page screenshot under the test's output folder."""
        self._shots += 1
        path = self.out_dir / f"{self._shots:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        _screenshots.append(path)
        return path


def _out_dir(nodeid: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid.split("tests/browser/", 1)[-1].replace(".py::", ".")).strip("-")
    path = OUTPUT_DIR / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def browser_page(browser, refusing_proxy, request) -> Iterator[BrowserPage]:
    """A fresh browser context (no shared cache, storage or cookies) with one page, watched."""
    watch = Watch()
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    context.expose_binding("__authappWatch", lambda _source, kind, detail: watch.reports.append((kind, detail)))
    context.add_init_script(WATCH_SCRIPT)
    context.on("request", lambda r: watch.requests.append(r))
    context.on("requestfailed", lambda r: watch.failed.append((r.url, r.failure or "")))
    page = context.new_page()
    page.on("console", lambda m: watch.console.append((m.type, m.text, m.location.get("url") or "")))
    page.on("pageerror", lambda e: watch.page_errors.append(str(e)))
    page.set_default_timeout(10_000)
    bp = BrowserPage(page, context, watch, _out_dir(request.node.nodeid))
    yield bp
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        page.screenshot(path=str(bp.out_dir / "failure.png"), full_page=True)
    context.close()
    assert watch.outside_loopback() == [], f"the page asked for addresses outside loopback: {watch.outside_loopback()}"
    assert watch.page_errors == [], watch.page_errors
    assert watch.reported("csp") == [], watch.reported("csp")
