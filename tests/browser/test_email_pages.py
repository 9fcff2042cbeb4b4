"""The example frontend's email pages in Chromium, with the messages going through a real
SMTP server and a courier: forgot password -> the message -> its link opened -> a new
password -> logged in; verify email; change email."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from browser_support import Authenticator, FrontendPage
from helpers import PASSWORD, bearer
from playwright.sync_api import expect

from authapp.mail import courier
from devtools.mailbox import Mailbox

pytestmark = pytest.mark.browser

NEW_PASSWORD = "quartz-lantern-meadow-81"


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    with Mailbox() as box:
        yield box


@pytest.fixture
def settings(frontend, mailbox):
    return {"CORS_ORIGINS": frontend.origin, "MAIL_URL": mailbox.url, "FRONTEND_URL": frontend.origin}


@pytest.fixture
def running_courier(app) -> Iterator[None]:
    """`flask mail courier`, in a thread of the test process."""
    with app.app_context():
        worker = courier.Courier(poll_interval=0.05)
    done = threading.Event()

    def run():
        with app.app_context():
            worker.run()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    worker.stop()
    assert done.wait(30)


@pytest.fixture
def site(browser_page, frontend, api, running_courier) -> FrontendPage:
    return FrontendPage(browser_page, frontend).open()


def new_user(client) -> tuple[str, str]:
    name = f"user{uuid.uuid4().hex[:8]}"
    body = {"email": f"{name}@example.com", "username": name, "password": PASSWORD}
    assert client.post("/auth/register", json=body).status_code == 201
    return name, f"{name}@example.com"


def open_link(site: FrontendPage, link: str) -> None:
    site.page.goto(link)
    expect(site.page.locator("html")).to_have_attribute("data-ready", "true")
    # The token left the address bar at once.
    assert "#token=" not in site.page.url and link.split("#token=")[1] not in site.page.url


def test_forgot_password_then_reset_and_logged_in(site, client, mailbox, browser_page):
    name, email = new_user(client)
    mailbox.wait_for(1, to=email)  # the verification link
    site.submit("forgot", email=email)
    expect(site.testid("notice")).to_contain_text(f"If an account uses {email}")
    browser_page.screenshot("forgot-password")
    message = mailbox.wait_for(2, to=email)[-1]
    link = message.link()
    assert link.startswith(site.site.origin + "/reset-password#token=")

    open_link(site, link)
    expect(site.testid("reset-view")).to_be_visible()
    browser_page.screenshot("reset-page")
    site.submit("reset", **{"new-password": "password123"})
    shown = site.error()
    assert shown["code"] == "VALIDATION_ERROR"
    assert any(line.startswith("new_password: ") and "too common" in line for line in shown["fields"]), shown
    browser_page.screenshot("reset-refused")

    site.submit("reset", **{"new-password": NEW_PASSWORD})
    assert site.error() == {}
    expect(site.testid("signed-in")).to_be_visible()
    expect(site.testid("me-username")).to_have_text(name)
    expect(site.testid("me-email-verified")).to_have_text("yes")  # the link proved the address
    expect(site.testid("reset-view")).to_be_hidden()
    browser_page.screenshot("reset-done")
    assert client.post("/auth/login", json={"username": name, "password": NEW_PASSWORD}).status_code == 200
    notice = mailbox.wait_for(3, to=email)[-1]
    assert "password was changed" in notice.subject
    site.assert_tokens_only_in_memory(tokens_answered(browser_page, "/auth/password-reset"))


def test_reset_of_a_two_factor_account_asks_for_a_code(site, client, mailbox, browser_page):
    name, email = new_user(client)
    access = client.post("/auth/login", json={"username": name, "password": PASSWORD}).get_json()["access_token"]
    setup = client.post("/auth/mfa/totp/setup", json={"current_password": PASSWORD}, headers=bearer(access))
    authenticator = Authenticator(setup.get_json()["secret"])
    enabled = client.post("/auth/mfa/totp/enable", json={"code": authenticator.code()}, headers=bearer(access))
    assert enabled.status_code == 200, enabled.get_json()
    site.submit("forgot", email=email)
    link = mailbox.wait_for(2, to=email)[-1].link()

    open_link(site, link)
    with site.page.expect_response(site.site.api_url + "/auth/password-reset") as reset:
        site.submit("reset", **{"new-password": NEW_PASSWORD})
    assert reset.value.json()["mfa_required"] is True and "access_token" not in reset.value.json()
    assert site.error() == {}
    expect(site.testid("notice")).to_contain_text("Enter a code to log in")
    expect(site.testid("mfa-step")).to_be_visible()
    expect(site.testid("signed-in")).to_be_hidden()
    browser_page.screenshot("reset-second-step")
    site.submit("mfa-verify", code=authenticator.code())
    assert site.error() == {}
    expect(site.testid("me-username")).to_have_text(name)
    expect(site.testid("me-mfa")).to_have_text("on")
    browser_page.screenshot("reset-done-with-code")
    site.assert_tokens_only_in_memory(tokens_answered(browser_page, "/auth/mfa/verify"))


def tokens_answered(browser_page, path: str) -> list[str]:
    """The access and refresh tokens of the page's successful POSTs to `path`."""
    tokens = []
    for request in browser_page.watch.requests:
        response = request.response() if request.method == "POST" and request.url.endswith(path) else None
        if response is not None and response.status == 200:
            tokens += [response.json()["access_token"], response.json()["refresh_token"]]
    return tokens


def test_verify_email(site, mailbox, browser_page):
    name = f"user{uuid.uuid4().hex[:8]}"
    email = f"{name}@example.com"
    site.register(email, name, PASSWORD)
    expect(site.testid("me-email-verified")).to_have_text("no")
    expect(site.testid("verify-request")).to_be_visible()
    site.click("verify-request")
    expect(site.testid("notice")).to_have_text("A new link is on its way to your address.")
    link = mailbox.wait_for(2, to=email)[-1].link()
    assert link.startswith(site.site.origin + "/verify-email#token=")

    open_link(site, link)
    expect(site.testid("verify-view")).to_be_visible()
    browser_page.screenshot("verify-page")
    site.click("verify-submit")
    expect(site.testid("notice")).to_have_text(f"Your address {email} is verified.")
    expect(site.testid("verify-view")).to_be_hidden()
    site.login(name, PASSWORD)
    expect(site.testid("me-email-verified")).to_have_text("yes")
    expect(site.testid("verify-request")).to_be_hidden()
    browser_page.screenshot("verified")


def test_change_email(site, client, mailbox, browser_page):
    name, email = new_user(client)
    site.login(name, PASSWORD)
    new_email = f"{name}.new@example.com"
    site.submit("change-email", new=new_email, password="not-the-password")
    assert site.error()["code"] == "INVALID_CREDENTIALS"
    expect(site.testid("signed-in")).to_be_visible()  # a wrong password does not end the session
    site.submit("change-email", new=new_email, password=PASSWORD)
    expect(site.testid("notice")).to_contain_text(f"A link was sent to {new_email}")
    browser_page.screenshot("change-email-requested")
    link = mailbox.wait_for(1, to=new_email)[-1].link()
    notice = [m for m in mailbox.wait_for(2, to=email) if "being changed" in m.subject]
    assert notice and new_email in notice[0].text

    open_link(site, link)
    site.click("verify-submit")
    expect(site.testid("notice")).to_have_text(f"Your address {new_email} is verified.")
    site.login(new_email, PASSWORD)
    expect(site.testid("me-email")).to_have_text(new_email)
    expect(site.testid("me-email-verified")).to_have_text("yes")
    browser_page.screenshot("email-changed")


def test_a_link_without_its_token_says_so(site, frontend):
    site.page.goto(frontend.origin + "/reset-password")
    expect(site.page.locator("html")).to_have_attribute("data-ready", "true")
    assert "has no token" in site.error()["detail"]
    expect(site.testid("reset-view")).to_be_hidden()
