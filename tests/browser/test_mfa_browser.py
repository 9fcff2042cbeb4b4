"""Two-factor authentication in examples/frontend, in Chromium against the live API: an
authenticator app set up from the key the page shows, the second step of a login with a
code and with a recovery code, new recovery codes, and turning it off. The codes are made
here with pyotp, as the user's app would make them."""

from __future__ import annotations

import urllib.parse

import pyotp
import pytest
from browser_support import STORED, Authenticator, FrontendPage, claims, new_user
from helpers import PASSWORD, bearer
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


@pytest.fixture
def settings(frontend):
    return {"CORS_ORIGINS": frontend.origin}


def assert_not_kept(site: FrontendPage, *secrets: str) -> None:
    """None of `secrets` in Web Storage, a cookie, the URL or the DOM."""
    stored = site.page.evaluate(STORED)
    for secret in secrets:
        assert secret and secret not in repr(stored), secret


def log_in_to_second_step(site: FrontendPage, api, identifier: str) -> str:
    """Log in with the password; returns the mfa_token the API answered, which the page holds."""
    with site.page.expect_response(api.url + "/auth/login") as login:
        site.login(identifier, PASSWORD)
    challenge = login.value.json()
    assert login.value.status == 200 and challenge["mfa_required"] is True, challenge
    assert "access_token" not in challenge and "refresh_token" not in challenge
    assert site.error() == {}
    expect(site.testid("mfa-step")).to_be_visible()
    expect(site.testid("signed-out")).to_be_hidden()
    expect(site.testid("signed-in")).to_be_hidden()
    assert_not_kept(site, challenge["mfa_token"])
    return challenge["mfa_token"]


def test_set_up_log_in_with_code_and_recovery_code_then_turn_off(site, api, frontend, client, browser_page):
    page, watch = site.page, browser_page.watch
    browser_page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=frontend.origin)
    username, email = new_user()
    site.register(email, username, PASSWORD)
    expect(site.testid("me-mfa")).to_have_text("off")
    expect(site.testid("mfa-setup-form")).to_be_visible()
    expect(site.testid("mfa-on")).to_be_hidden()
    other = client.post("/auth/login", json={"username": username, "password": PASSWORD}).get_json()

    # A wrong current password is refused, and the session in the page goes on.
    site.submit("mfa-setup", password="not-the-password")
    assert site.error()["code"] == "INVALID_CREDENTIALS"
    expect(site.testid("signed-in")).to_be_visible()
    expect(site.testid("mfa-enroll")).to_be_hidden()

    # Setup: the QR code as an image, the key as text, a link for an app on this device.
    with page.expect_response(api.url + "/auth/mfa/totp/setup") as setup:
        site.submit("mfa-setup", password=PASSWORD)
    assert setup.value.status == 200 and site.error() == {}
    answer = setup.value.json()
    expect(site.testid("mfa-enroll")).to_be_visible()
    expect(site.testid("mfa-setup-form")).to_be_hidden()
    secret = site.testid("mfa-secret").inner_text()
    assert secret == answer["secret"]
    qr = site.testid("mfa-qr")
    scheme, _, data = qr.get_attribute("src").partition(",")
    assert scheme == "data:image/svg+xml;charset=utf-8"
    assert urllib.parse.unquote(data) == answer["qr_svg"]
    qr.evaluate("img => img.decode()")  # rejects when the image cannot be shown
    assert qr.evaluate("img => img.complete && img.naturalWidth > 0")
    assert page.locator("svg").count() == 0  # an image, not markup in the page
    link = site.testid("mfa-otpauth")
    assert link.get_attribute("href") == answer["otpauth_uri"]
    assert pyotp.parse_uri(answer["otpauth_uri"]).secret == secret
    browser_page.screenshot("setup")

    authenticator = Authenticator(secret)
    site.submit("mfa-enable", code=authenticator.wrong_code())
    assert site.error()["code"] == "VALIDATION_ERROR"
    expect(site.testid("mfa-enroll")).to_be_visible()
    expect(site.testid("me-mfa")).to_have_text("off")

    with page.expect_response(api.url + "/auth/mfa/totp/enable") as enable:
        site.submit("mfa-enable", code=authenticator.code())
    assert enable.value.status == 200 and site.error() == {}
    codes = enable.value.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    expect(site.testid("recovery-code")).to_have_text(codes)
    expect(site.testid("me-mfa")).to_have_text("on")
    expect(site.testid("mfa-enroll")).to_be_hidden()
    expect(site.testid("mfa-on")).to_be_visible()
    expect(site.testid("notice")).to_contain_text("Two-factor authentication is on")
    expect(site.sessions()).to_have_count(1)  # every other session was logged out
    expect(site.sessions().first).to_contain_text("with two-factor authentication")  # raised to aal2
    revoked = client.get("/auth/me", headers=bearer(other["access_token"]))
    assert revoked.get_json()["error_code"] == "TOKEN_REVOKED"
    assert_not_kept(site, secret)  # the key left the page
    browser_page.screenshot("recovery-codes")

    site.click("mfa-codes-copy")
    expect(site.testid("notice")).to_have_text("The recovery codes are on the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == "\n".join(codes) + "\n"
    site.click("mfa-codes-done")
    expect(site.testid("mfa-codes")).to_be_hidden()
    assert_not_kept(site, *codes)  # shown once

    # The second step of a login, with a code from the app.
    site.click("logout")
    expect(site.testid("signed-out")).to_be_visible()
    mfa_token = log_in_to_second_step(site, api, email)
    browser_page.screenshot("second-step")
    code = authenticator.code()
    with page.expect_request(api.url + "/auth/mfa/verify") as verify:
        site.submit("mfa-verify", code=f"{code[:3]} {code[3:]}")  # as the app shows it
    assert verify.value.post_data_json == {"mfa_token": mfa_token, "code": code}
    assert site.error() == {}
    expect(site.testid("me-username")).to_have_text(username)
    expect(site.testid("mfa-step")).to_be_hidden()
    assert claims(verify.value.response().json()["access_token"])["aal"] == "aal2"
    browser_page.screenshot("logged-in-with-code")

    # Once more: the same code again is refused, the step stays open, and a recovery code logs in.
    site.click("logout")
    mfa_token = log_in_to_second_step(site, api, username)
    assert authenticator.steps_since_last() <= 1  # the code is still in its time window: refused as used
    site.submit("mfa-verify", code=code)
    assert site.error()["code"] == "INVALID_MFA_CODE"
    expect(site.testid("mfa-step")).to_be_visible()
    expect(site.testid("mfa-verify-code")).to_have_value("")
    with page.expect_request(api.url + "/auth/mfa/verify") as verify:
        site.submit("mfa-recovery", code=codes[0])
    assert verify.value.post_data_json == {"mfa_token": mfa_token, "recovery_code": codes[0]}
    assert site.error() == {}
    expect(site.testid("me-username")).to_have_text(username)
    expect(site.testid("notice")).to_contain_text("recovery code is used up")
    assert claims(verify.value.response().json()["access_token"])["aal"] == "aal2"
    browser_page.screenshot("logged-in-with-recovery-code")

    # New recovery codes: the old ones stop working.
    site.submit("mfa-regenerate", password="not-the-password")
    assert site.error()["code"] == "INVALID_CREDENTIALS"
    expect(site.testid("signed-in")).to_be_visible()
    with page.expect_response(api.url + "/auth/mfa/recovery-codes") as regenerated:
        site.submit("mfa-regenerate", password=PASSWORD)
    assert regenerated.value.status == 200 and site.error() == {}
    new_codes = regenerated.value.json()["recovery_codes"]
    assert len(new_codes) == 10 and not set(new_codes) & set(codes)
    expect(site.testid("recovery-code")).to_have_text(new_codes)
    browser_page.screenshot("new-recovery-codes")
    site.click("mfa-codes-done")
    elsewhere = client.post("/auth/login", json={"username": username, "password": PASSWORD}).get_json()
    old = client.post("/auth/mfa/verify", json={"mfa_token": elsewhere["mfa_token"], "recovery_code": codes[1]})
    assert (old.status_code, old.get_json()["error_code"]) == (401, "INVALID_MFA_CODE")
    third = client.post("/auth/mfa/verify", json={"mfa_token": elsewhere["mfa_token"], "recovery_code": new_codes[0]})
    assert third.status_code == 200, third.get_json()

    # Turning it off logs out every other session; a login is one step again.
    site.submit("mfa-disable", password="not-the-password")
    assert site.error()["code"] == "INVALID_CREDENTIALS"
    expect(site.testid("me-mfa")).to_have_text("on")
    with page.expect_response(api.url + "/auth/mfa/disable") as disabled:
        site.submit("mfa-disable", password=PASSWORD)
    assert disabled.value.status == 204 and site.error() == {}
    expect(site.testid("me-mfa")).to_have_text("off")
    expect(site.testid("mfa-setup-form")).to_be_visible()
    expect(site.testid("mfa-on")).to_be_hidden()
    expect(site.testid("notice")).to_contain_text("Two-factor authentication is off")
    expect(site.sessions()).to_have_count(1)
    revoked = client.get("/auth/me", headers=bearer(third.get_json()["access_token"]))
    assert revoked.get_json()["error_code"] == "TOKEN_REVOKED"
    site.click("logout")
    with page.expect_response(api.url + "/auth/login") as login:
        site.login(email, PASSWORD)
    assert "access_token" in login.value.json()
    expect(site.testid("me-username")).to_have_text(username)
    expect(site.testid("mfa-step")).to_be_hidden()
    expect(site.sessions().first).not_to_contain_text("two-factor")  # a password alone: aal1
    browser_page.screenshot("off")

    site.assert_tokens_only_in_memory(site.issued_tokens(api.url))
    assert [e for e in watch.console_errors() if "the server responded with a status of 4" not in e] == []


def test_second_step_cancelled_dead_or_timed_out_and_the_page_keeps_nothing(site, api, client, browser_page):
    site.page.clock.install()  # the page's timers, which this test moves on at the end
    username, email = new_user()
    site.register(email, username, PASSWORD)
    site.submit("mfa-setup", password=PASSWORD)
    authenticator = Authenticator(site.testid("mfa-secret").inner_text())
    site.submit("mfa-enable", code=authenticator.code())
    expect(site.testid("me-mfa")).to_have_text("on")
    codes = site.testid("recovery-code").all_inner_texts()
    assert len(codes) == 10
    site.click("logout")
    # Logging out took the recovery codes off the page even though "saved" was never pressed.
    expect(site.testid("mfa-codes")).to_be_hidden()
    expect(site.testid("recovery-code")).to_have_count(0)

    mfa_token = log_in_to_second_step(site, api, email)
    site.click("mfa-cancel")
    expect(site.testid("mfa-step")).to_be_hidden()
    expect(site.testid("signed-out")).to_be_visible()
    # Cancelled in the page: the token is forgotten there, and nothing was sent to spend it.
    assert "/auth/mfa/verify" not in [path for _, path in browser_page.watch.api_calls(api.url)]
    assert_not_kept(site, mfa_token)
    browser_page.screenshot("cancelled")

    # A challenge spent elsewhere meanwhile: no code can help, the page asks for the password again.
    mfa_token = log_in_to_second_step(site, api, username)
    spent = client.post("/auth/mfa/verify", json={"mfa_token": mfa_token, "recovery_code": codes[0]})
    assert spent.status_code == 200, spent.get_json()
    site.submit("mfa-recovery", code=codes[1])
    shown = site.error()
    assert shown["code"] == "INVALID_TOKEN" and shown["request_id"], shown
    expect(site.testid("mfa-step")).to_be_hidden()
    expect(site.testid("signed-out")).to_be_visible()
    assert_not_kept(site, mfa_token)
    browser_page.screenshot("dead-challenge")

    # The challenge lives 5 minutes (expires_in): then the page lets go of it too.
    mfa_token = log_in_to_second_step(site, api, username)
    site.page.clock.run_for("04:59")
    expect(site.testid("mfa-step")).to_be_visible()
    site.page.clock.run_for("00:01")
    expect(site.testid("mfa-step")).to_be_hidden()
    expect(site.testid("signed-out")).to_be_visible()
    expect(site.testid("notice")).to_have_text("The login timed out before the second step: log in again.")
    assert_not_kept(site, mfa_token)
    browser_page.screenshot("timed-out")


def test_the_qr_code_runs_nothing_whatever_it_contains(site, api, browser_page):
    """The page shows the QR code as an image: an SVG carrying script, an event handler and
    a remote image, put in the API's answer on its way to the page, runs and loads nothing
    (the fixture fails the test on any CSP violation or request outside loopback)."""
    page = site.page
    hostile = (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="40" height="40" '
        'onload="window.__injected = 1"><script>window.__injected = 2</script>'
        '<image href="http://198.51.100.7/x.png" width="40" height="40"/>'
        '<rect width="20" height="20"/></svg>'
    )

    def swap(route):
        response = route.fetch()
        body = response.json()
        body["qr_svg"] = hostile
        route.fulfill(response=response, json=body)

    page.route(api.url + "/auth/mfa/totp/setup", swap)
    username, email = new_user()
    site.register(email, username, PASSWORD)
    site.submit("mfa-setup", password=PASSWORD)
    assert site.error() == {}
    qr = site.testid("mfa-qr")
    assert urllib.parse.unquote(qr.get_attribute("src").partition(",")[2]) == hostile
    qr.evaluate("img => img.decode()")
    assert qr.evaluate("img => img.naturalWidth") == 40
    assert page.evaluate("window.__injected") is None
    assert page.locator("svg").count() == 0
    browser_page.screenshot("hostile-qr")
