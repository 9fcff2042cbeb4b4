"""examples/frontend, served from its own origin, talking to the API across origins in a
real browser: CORS is the browser's, not a Python client's that ignores it."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from browser_support import FrontendPage, StaticSite, claims, expect_idle, new_user
from helpers import PASSWORD, bearer
from playwright.sync_api import expect

from authapp import settings as app_settings

pytestmark = pytest.mark.browser

HTTP_ERROR_IN_CONSOLE = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d\b")


@pytest.fixture
def settings(frontend):
    return {"CORS_ORIGINS": frontend.origin}


def only_http_errors_in_console(watch) -> None:
    """Chromium logs every 4xx the page received; anything else in the console is a bug."""
    assert [e for e in watch.console_errors() if not HTTP_ERROR_IN_CONSOLE.match(e)] == []


def test_whole_flow_from_a_listed_origin(site, api, frontend, client, browser_page):
    page, watch = site.page, browser_page.watch
    expect(site.testid("api-base")).to_have_text(api.url)
    assert frontend.origin != api.url  # two origins: the port differs
    browser_page.screenshot("signed-out")
    username, email = new_user()

    # A refused registration shows the envelope's detail, field errors and request id.
    with page.expect_response(api.url + "/auth/register") as refused:
        site.register(email, username, "short")
    assert refused.value.status == 400
    shown = site.error()
    assert shown["detail"] == "Request validation failed" and shown["code"] == "VALIDATION_ERROR"
    assert any(line.startswith("password: ") for line in shown["fields"]), shown
    assert shown["request_id"] == refused.value.headers["x-request-id"] == refused.value.json()["request_id"]
    browser_page.screenshot("validation-error")

    with page.expect_response(api.url + "/auth/register") as registered:
        site.register(email, username, PASSWORD)
    assert registered.value.status == 201
    assert registered.value.request.all_headers()["origin"] == frontend.origin
    assert registered.value.headers["access-control-allow-origin"] == frontend.origin
    assert site.error() == {}
    expect(site.testid("signed-in")).to_be_visible()
    expect(site.testid("signed-out")).to_be_hidden()
    expect(site.testid("me-username")).to_have_text(username)
    expect(site.testid("me-email")).to_have_text(email)
    expect(site.sessions()).to_have_count(1)
    expect(site.sessions().first).to_have_attribute("data-current", "true")
    browser_page.screenshot("registered")

    # Another device logs in, with a user agent that would run script if rendered as markup.
    agent = '<img src=x onerror="window.__injected = 1"> Evil/1.0'
    other = client.post("/auth/login", json={"username": username, "password": PASSWORD}, headers={"User-Agent": agent})
    assert other.status_code == 200
    other_sid = claims(other.get_json()["access_token"])["sid"]

    site.click("reload")
    expect(site.sessions()).to_have_count(2)
    listed = site.sessions().filter(has_text="Evil/1.0")
    expect(listed).to_have_attribute("data-session-id", other_sid)
    expect(listed).to_have_attribute("data-current", "false")
    expect(listed).to_contain_text(agent)  # shown as text, not parsed
    assert page.evaluate("window.__injected") is None
    browser_page.screenshot("two-sessions")

    listed.get_by_test_id("revoke-session").click()
    expect_idle(page)
    expect(site.sessions()).to_have_count(1)
    expect(site.testid("notice")).to_have_text("The session was revoked.")
    revoked = client.get("/auth/me", headers=bearer(other.get_json()["access_token"]))
    assert (revoked.status_code, revoked.get_json()["error_code"]) == (401, "TOKEN_REVOKED")
    browser_page.screenshot("session-revoked")

    page_tokens = site.issued_tokens(api.url)
    with page.expect_request(api.url + "/auth/logout") as logout:
        site.click("logout")
    assert logout.value.post_data_json == {"refresh_token": page_tokens[-1]}
    assert logout.value.all_headers()["authorization"] == f"Bearer {page_tokens[-2]}"
    expect(site.testid("signed-out")).to_be_visible()
    expect(site.testid("notice")).to_have_text("You are logged out.")
    expect(site.sessions()).to_have_count(0)
    for path, kwargs in [
        ("/auth/refresh", {"json": {"refresh_token": page_tokens[-1]}}),
        ("/auth/me", {"headers": bearer(page_tokens[-2])}),
    ]:
        after = client.open(path, method="POST" if path == "/auth/refresh" else "GET", **kwargs)
        assert (after.status_code, after.get_json()["error_code"]) == (401, "TOKEN_REVOKED"), path
    browser_page.screenshot("logged-out")

    with page.expect_response(api.url + "/auth/login") as wrong:
        site.login(email, "not-the-password")
    shown = site.error()
    assert shown["detail"] == "Invalid credentials" and shown["code"] == "INVALID_CREDENTIALS"
    assert shown["request_id"] == wrong.value.headers["x-request-id"]
    browser_page.screenshot("login-error")

    with page.expect_request(api.url + "/auth/login") as by_username:
        site.login(username.upper(), PASSWORD)
    assert by_username.value.post_data_json == {"username": username.upper(), "password": PASSWORD}
    assert site.error() == {}
    expect(site.testid("me-username")).to_have_text(username)
    expect(site.testid("me-last-login")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"))
    expect(site.sessions()).to_have_count(1)
    browser_page.screenshot("logged-in-again")

    site.assert_tokens_only_in_memory(site.issued_tokens(api.url))
    only_http_errors_in_console(watch)


def test_unlisted_origin_is_refused_by_the_browser(browser_page, frontend, api, client, app):
    """The API lists `frontend`'s origin only; the same page from another origin cannot use
    it: the browser's preflight fails, the POST is never sent, and the page says so."""
    username, email = new_user()
    with StaticSite(api_url=api.url).running() as stranger:
        assert stranger.origin != frontend.origin
        site = FrontendPage(browser_page, stranger).open()
        site.register(email, username, PASSWORD)
        shown = site.error()
        assert shown["detail"].startswith(f"Could not reach the API at {api.url}"), shown
        assert stranger.origin in shown["detail"] and shown["request_id"] is None
        expect(site.testid("signed-in")).to_be_hidden()
        browser_page.screenshot("refused-origin")
    watch = browser_page.watch
    assert [url for url, _ in watch.failed] == [api.url + "/auth/register"]
    assert any("blocked by CORS policy" in e for e in watch.console_errors()), watch.console_errors()
    # The browser asked (a preflight) and, without an Access-Control-Allow-Origin for its
    # origin, never sent the registration itself: no account exists.
    assert ("OPTIONS", "/auth/register", stranger.origin) in api.received
    assert [r for r in api.received if r[0] == "POST"] == []
    login = client.post("/auth/login", json={"username": username, "password": PASSWORD})
    assert login.status_code == 401

    # The same page from the listed origin, against the same API, works.
    site = FrontendPage(browser_page, frontend).open()
    site.register(email, username, PASSWORD)
    assert site.error() == {}
    expect(site.testid("me-username")).to_have_text(username)
    assert ("POST", "/auth/register", frontend.origin) in api.received
    browser_page.screenshot("listed-origin")


def test_expired_access_token_is_refreshed_once_and_the_calls_retried(site, api, app, client, browser_page):
    # The flows read the settings object, made again here from the changed config.
    app.config["JWT_ACCESS_TOKEN_EXPIRES"] = timedelta(seconds=2)
    app_settings.init_app(app)
    watch = browser_page.watch
    username, email = new_user()
    site.register(email, username, PASSWORD)
    expect(site.testid("me-username")).to_have_text(username)
    first_access, first_refresh = site.issued_tokens(api.url)
    exp = claims(first_access)["exp"]
    assert exp - claims(first_access)["iat"] == 2
    time.sleep(max(0.0, exp - time.time()) + 0.5)
    expired = client.get("/auth/me", headers=bearer(first_access))
    assert expired.get_json()["error_code"] == "TOKEN_EXPIRED"  # really expired: the page must refresh

    seen = len(watch.requests)
    site.click("reload")  # /auth/me and /auth/sessions at once: both get 401 TOKEN_EXPIRED
    assert site.error() == {}
    expect(site.testid("notice")).to_contain_text("refreshed")
    expect(site.testid("me-username")).to_have_text(username)
    expect(site.sessions()).to_have_count(1)
    browser_page.screenshot("refreshed")

    calls = [(r.method, r.url.removeprefix(api.url), r) for r in watch.requests[seen:]]
    refreshes = [r for method, path, r in calls if path == "/auth/refresh"]
    assert len(refreshes) == 1, [c[:2] for c in calls]  # one refresh for both calls
    assert refreshes[0].post_data_json == {"refresh_token": first_refresh}
    assert refreshes[0].response().status == 200
    new_access = refreshes[0].response().json()["access_token"]
    assert new_access != first_access
    for path in ("/auth/me", "/auth/sessions"):
        tries = [r for method, p, r in calls if p == path]
        assert [r.response().status for r in tries] == [401, 200], path
        assert tries[0].response().json()["error_code"] == "TOKEN_EXPIRED"
        assert tries[0].all_headers()["authorization"] == f"Bearer {first_access}"
        assert tries[1].all_headers()["authorization"] == f"Bearer {new_access}"
    site.assert_tokens_only_in_memory(site.issued_tokens(api.url))
    only_http_errors_in_console(watch)


def test_a_retry_that_fails_again_is_not_refreshed_again(site, api, app, browser_page):
    """Access tokens that are born expired: the page refreshes once, retries once, and then
    shows the error instead of looping."""
    app.config["JWT_ACCESS_TOKEN_EXPIRES"] = timedelta(0)
    app_settings.init_app(app)
    watch = browser_page.watch
    username, email = new_user()
    site.register(email, username, PASSWORD)  # then lists the sessions: 401, refresh, 401
    shown = site.error()
    assert shown["code"] == "TOKEN_EXPIRED" and shown["detail"] == "Token has expired", shown
    assert shown["request_id"]
    calls = watch.api_calls(api.url)
    assert calls == [
        ("POST", "/auth/register"),
        ("GET", "/auth/sessions"),
        ("POST", "/auth/refresh"),
        ("GET", "/auth/sessions"),
    ]
    last = [r for r in watch.requests if r.url == api.url + "/auth/sessions"][-1].response()
    assert shown["request_id"] == last.headers["x-request-id"]
    browser_page.screenshot("expired-twice")
    only_http_errors_in_console(watch)


def test_a_revoked_session_signs_the_page_out_without_refreshing(site, api, client, browser_page):
    watch = browser_page.watch
    username, email = new_user()
    site.register(email, username, PASSWORD)
    other = client.post("/auth/login", json={"email": email, "password": PASSWORD}).get_json()
    assert client.post("/auth/logout-all", headers=bearer(other["access_token"])).status_code == 204

    seen = len(watch.requests)
    site.click("reload")
    shown = site.error()
    assert shown["code"] == "TOKEN_REVOKED" and shown["request_id"], shown
    expect(site.testid("signed-out")).to_be_visible()
    assert "/auth/refresh" not in [r.url.removeprefix(api.url) for r in watch.requests[seen:]]
    browser_page.screenshot("revoked-elsewhere")
    only_http_errors_in_console(watch)


def test_the_shipped_page_points_at_make_run(browser_page):
    """Served as it is in the repository, config.js and app.js load under the page's own CSP
    and aim at the address `make run` serves."""
    with StaticSite().running() as plain:
        site = FrontendPage(browser_page, plain).open()
        expect(site.testid("api-base")).to_have_text("http://127.0.0.1:5000")
        expect(site.testid("page-origin")).to_have_text(plain.origin)
        expect(site.testid("signed-out")).to_be_visible()
        expect(site.testid("signed-in")).to_be_hidden()
    requested = {r.url.removeprefix(plain.origin) for r in browser_page.watch.requests}
    assert requested - {"/favicon.svg"} == {"/", "/app.js", "/config.js", "/style.css"}  # the icon may come late
    assert browser_page.watch.console_errors() == []
