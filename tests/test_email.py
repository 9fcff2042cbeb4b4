"""Email flows end to end against a real SMTP server (aiosmtpd on a loopback port): the
outbox and the courier, the messages as they arrive, password reset, email verification,
change of address, and every rule of the one-time tokens. On SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from helpers import PASSWORD, assert_error, base_settings, bearer, sid_of
from sqlalchemy import func, select, update

from authapp import clock, create_app
from authapp.database import unit_of_work
from authapp.extensions import db
from authapp.mail import courier
from authapp.models import AuthSession, OneTimeToken, OutboxMessage, User
from devtools.mailbox import Mailbox

FRONTEND = "https://app.example.com"
NEW_PASSWORD = "quartz-lantern-meadow-81"
LINK_RE = re.compile(r"^https://app\.example\.com/(reset-password|verify-email)#token=[A-Za-z0-9_-]{43}$")


@pytest.fixture
def mailbox():
    with Mailbox() as box:
        yield box


@pytest.fixture
def mail_settings(mailbox):
    return {"MAIL_URL": mailbox.url, "MAIL_FROM": "Example <no-reply@example.com>", "FRONTEND_URL": FRONTEND}


@pytest.fixture
def settings(mail_settings):
    return mail_settings


def deliver(app) -> int:
    """What a courier does in one pass over the due messages (repeated until none is due)."""
    total = 0
    with app.app_context():
        worker = courier.Courier(poll_interval=0)
        while handled := worker.deliver_due():
            total += handled
    return total


def outbox_rows(app) -> list[OutboxMessage]:
    with app.app_context():
        return list(db.session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def audit_events(log_lines, event: str) -> list[dict]:
    """The audit events named `event` logged so far, oldest first."""
    return [line for line in log_lines() if line.get("audit") and line.get("event") == event]


def frozen_clock(monkeypatch, at):
    """Stop the service's clock at `at` (it stands still while links are made and mailed)."""
    monkeypatch.setattr(clock, "now", lambda: at)


def register(client, name="alice", password=PASSWORD):
    response = client.post(
        "/auth/register", json={"email": f"{name}@example.com", "username": name, "password": password}
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def request_reset(client, address="alice@example.com"):
    response = client.post("/auth/password-reset/request", json={"email": address})
    assert response.status_code == 202, response.get_json()
    assert response.get_json() == {"status": "accepted"}
    return response


def reset_token(app, mailbox, address="alice@example.com") -> str:
    deliver(app)
    resets = [m for m in mailbox.messages(address) if "/reset-password#" in m.text]
    return resets[-1].token()


# -- The messages as they arrive --------------------------------------------------------


def test_reset_message_arrives_with_both_parts_the_headers_and_a_fragment_link(app, client, mailbox):
    register(client)
    deliver(app)  # the verification link of the registration
    before = len(mailbox.messages())
    request_reset(client)
    assert len(mailbox.messages()) == before, "SMTP on the request path"
    assert deliver(app) == 1
    message = mailbox.messages()[-1]
    assert message.rcpt_tos == ["alice@example.com"] and message.to == "alice@example.com"
    assert message.mail_from == "no-reply@example.com"
    headers = message.message
    assert headers["From"] == "Example <no-reply@example.com>"
    assert headers["Subject"] == "Reset your Example password"
    assert headers["Auto-Submitted"] == "auto-generated"
    assert re.fullmatch(r"<[^<>@\s]+@example\.com>", headers["Message-ID"])
    assert headers["Date"].datetime is not None and abs(headers["Date"].datetime - clock.now()) < timedelta(minutes=1)
    assert headers.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in headers.iter_parts()] == ["text/plain", "text/html"]
    link = message.link()
    assert LINK_RE.match(link) and "?" not in link
    assert f'href="{link}"' in message.html
    assert "Hello alice" in message.text and "within 1 hour" in message.text
    # Delivered: the outbox keeps neither the address nor the body.
    row = outbox_rows(app)[-1]
    assert row.status == "sent" and row.recipient is None and row.body_text is None and row.body_html is None
    assert row.subject is None and row.attempts == 1


def test_every_kind_of_message_has_both_parts_and_a_subject(app, client, mailbox):
    tokens = register(client)
    request_reset(client)
    token = reset_token(app, mailbox)
    reset = client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD}).get_json()
    client.post(
        "/auth/change-email",
        headers=bearer(reset["access_token"]),
        json={"new_email": "alice2@example.com", "current_password": NEW_PASSWORD},
    )
    deliver(app)
    subjects = [m.subject for m in mailbox.messages()]
    assert subjects == [
        "Confirm your email address for Example",
        "Reset your Example password",
        "Your Example password was changed",
        "Confirm your new email address for Example",
        "Your Example address is being changed",
    ]
    for message in mailbox.messages():
        assert message.text.strip() and "<p>" in message.html
    assert tokens["user"]["email_verified"] is False


# -- Password reset ---------------------------------------------------------------------


def test_reset_revokes_every_session_clears_the_lockout_and_verifies_the_address(mailbox, database_url, tmp_path):
    app = create_app(
        base_settings(
            DATABASE_URL=database_url,
            MAIL_URL=mailbox.url,
            FRONTEND_URL=FRONTEND,
            MAIL_FROM="no-reply@example.com",
            LOGIN_MAX_FAILURES="3",
        )
    )
    client = app.test_client()
    first = register(client)
    second = client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).get_json()
    for _ in range(3):
        client.post("/auth/login", json={"username": "alice", "password": "not-the-password-1"})
    assert_error(client.post("/auth/login", json={"username": "alice", "password": PASSWORD}), 429, "RATE_LIMITED")

    request_reset(client)
    token = reset_token(app, mailbox)
    response = client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in", "aal", "user"}
    assert body["user"]["email_verified"] is True and body["user"]["mfa_enabled"] is False
    assert token not in response.get_data(as_text=True)
    for old in (first, second):
        assert_error(client.get("/auth/me", headers=bearer(old["access_token"])), 401, "TOKEN_REVOKED")
    assert client.get("/auth/me", headers=bearer(body["access_token"])).get_json()["email_verified"] is True
    # The lockout is cleared, the old password is gone, the new one works.
    assert_error(
        client.post("/auth/login", json={"username": "alice", "password": PASSWORD}), 401, "INVALID_CREDENTIALS"
    )
    assert client.post("/auth/login", json={"username": "alice", "password": NEW_PASSWORD}).status_code == 200
    # The user hears of it.
    deliver(app)
    notice = mailbox.messages()[-1]
    assert notice.subject == "Your authapp password was changed" and "logged out" in notice.text
    assert sid_of(body) != sid_of(first)
    with app.app_context():
        db.engine.dispose()


def test_unknown_and_inactive_addresses_get_the_same_answer_and_no_message(app, client, mailbox, cli_runner):
    register(client)
    deliver(app)
    before = len(mailbox.messages())
    known = client.post("/auth/password-reset/request", json={"email": "alice@example.com"})
    unknown = client.post("/auth/password-reset/request", json={"email": "nobody@example.com"})
    assert (
        (known.status_code, known.get_json())
        == (unknown.status_code, unknown.get_json())
        == (202, {"status": "accepted"})
    )
    assert deliver(app) == 1
    assert [m.rcpt_tos for m in mailbox.messages()[before:]] == [["alice@example.com"]]
    # Both requests left one row each: the unknown one suppressed, holding nothing.
    rows = outbox_rows(app)[-2:]
    assert [r.status for r in rows] == ["sent", "suppressed"]
    assert rows[1].recipient is None and rows[1].body_text is None and rows[1].user_id is None

    assert cli_runner("users", "deactivate", "alice").exit_code == 0
    request_reset(client)
    assert deliver(app) == 0
    assert len(mailbox.messages()) == before + 1  # the first reset only


@pytest.fixture
def cli_runner(app):
    runner = app.test_cli_runner()
    return lambda *args, **kw: runner.invoke(args=list(args), **kw)


def test_a_reset_token_works_once(app, client, mailbox):
    register(client)
    request_reset(client)
    token = reset_token(app, mailbox)
    assert client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD}).status_code == 200
    again = client.post("/auth/password-reset", json={"token": token, "new_password": "another-lantern-pass-5"})
    assert_error(again, 400, "INVALID_LINK")


def test_a_reset_token_expires(app, client, mailbox, monkeypatch):
    register(client)
    issued = clock.now()  # the clock stands still while the link is made and mailed
    monkeypatch.setattr(clock, "now", lambda: issued)
    request_reset(client)
    token = reset_token(app, mailbox)
    monkeypatch.setattr(clock, "now", lambda: issued + timedelta(minutes=59, seconds=59))
    weak = client.post("/auth/password-reset", json={"token": token, "new_password": "short"})
    assert_error(weak, 400, "VALIDATION_ERROR")  # still live a second before the hour
    monkeypatch.setattr(clock, "now", lambda: issued + timedelta(minutes=60))
    late = client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert_error(late, 400, "INVALID_LINK")


def test_a_newer_request_voids_the_older_token(app, client, mailbox):
    register(client)
    request_reset(client)
    older = reset_token(app, mailbox)
    request_reset(client)
    newer = reset_token(app, mailbox)
    assert older != newer
    assert_error(
        client.post("/auth/password-reset", json={"token": older, "new_password": NEW_PASSWORD}), 400, "INVALID_LINK"
    )
    assert client.post("/auth/password-reset", json={"token": newer, "new_password": NEW_PASSWORD}).status_code == 200


def test_a_validation_failure_spends_nothing(app, client, mailbox):
    register(client)
    request_reset(client)
    token = reset_token(app, mailbox)
    for bad in ("short", "password123", "alice-is-my-name-1"):
        response = client.post("/auth/password-reset", json={"token": token, "new_password": bad})
        body = assert_error(response, 400, "VALIDATION_ERROR")
        assert body["errors"]["new_password"], body
    assert client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD}).status_code == 200


@pytest.mark.parametrize("token", ["", "x", "A" * 43, "A" * 500, "../../etc", "tok en"])
def test_unknown_tokens_are_invalid_links(client, token):
    response = client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert_error(response, 400, "INVALID_LINK")
    assert_error(client.post("/auth/verify-email", json={"token": token}), 400, "INVALID_LINK")


def test_a_token_of_one_kind_is_refused_by_the_other_endpoint(app, client, mailbox):
    register(client)
    deliver(app)
    verify = mailbox.messages()[-1].token()
    assert_error(
        client.post("/auth/password-reset", json={"token": verify, "new_password": NEW_PASSWORD}), 400, "INVALID_LINK"
    )
    request_reset(client)
    reset = reset_token(app, mailbox)
    assert_error(client.post("/auth/verify-email", json={"token": reset}), 400, "INVALID_LINK")
    assert client.post("/auth/verify-email", json={"token": verify}).status_code == 200


def test_tokens_are_stored_hashed_and_never_logged_or_answered(app, client, mailbox, log_lines):
    register(client)
    request_reset(client)
    token = reset_token(app, mailbox)
    response = client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert token not in response.get_data(as_text=True)
    with app.app_context():
        stored = list(db.session.scalars(select(OneTimeToken.token_hash)))
    assert stored and token not in stored and all(len(h) == 64 for h in stored)
    every_line = repr(log_lines())
    assert token not in every_line and "#token=" not in every_line


def test_per_recipient_limit_still_answers_202(mailbox, database_url):
    app = create_app(
        base_settings(DATABASE_URL=database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND, MAIL_RATE_LIMIT="2/hour")
    )
    client = app.test_client()
    register(client)
    for _ in range(4):
        request_reset(client)
    deliver(app)
    resets = [m for m in mailbox.messages() if "/reset-password#" in m.text]
    assert len(resets) == 2
    statuses = [r.status for r in outbox_rows(app) if r.kind == "password_reset"]
    assert statuses == ["sent", "sent", "suppressed", "suppressed"]
    with app.app_context():
        db.engine.dispose()


# -- Email verification -----------------------------------------------------------------


def test_verification_optional_by_default(app, client, mailbox):
    tokens = register(client)
    assert tokens["user"]["email_verified"] is False and "access_token" in tokens
    deliver(app)
    message = mailbox.messages()[-1]
    assert message.subject.startswith("Confirm your email address") and LINK_RE.match(message.link())
    assert "/verify-email#token=" in message.link()
    verified = client.post("/auth/verify-email", json={"token": message.token()})
    assert verified.status_code == 200
    assert verified.get_json()["email_verified"] is True and verified.get_json()["email"] == "alice@example.com"
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).get_json()["email_verified"] is True
    # Verified already: accepted, nothing sent.
    again = client.post("/auth/verify-email/request", headers=bearer(tokens["access_token"]))
    assert (again.status_code, again.get_json()) == (202, {"status": "accepted"})
    assert deliver(app) == 0
    assert_error(client.post("/auth/verify-email", json={"token": message.token()}), 400, "INVALID_LINK")


def test_verification_request_sends_a_new_link_and_voids_the_old(app, client, mailbox):
    tokens = register(client)
    deliver(app)
    first = mailbox.messages()[-1].token()
    assert client.post("/auth/verify-email/request", headers=bearer(tokens["access_token"])).status_code == 202
    deliver(app)
    second = mailbox.messages()[-1].token()
    assert_error(client.post("/auth/verify-email", json={"token": first}), 400, "INVALID_LINK")
    assert client.post("/auth/verify-email", json={"token": second}).status_code == 200
    assert_error(client.post("/auth/verify-email/request"), 401, "MISSING_TOKEN")


# EMAIL_TOKEN_HOURS unset (the contract's 24) and set.
TOKEN_HOURS = pytest.mark.parametrize("hours", [None, 3], ids=["default", "EMAIL_TOKEN_HOURS=3"])


def email_app(database_url, mail_settings, hours):
    return create_app(
        base_settings(
            DATABASE_URL=database_url, **mail_settings, **({} if hours is None else {"EMAIL_TOKEN_HOURS": hours})
        )
    )


def verify_at_the_end(monkeypatch, client, end, used, expired):
    """Two links that end at `end`: `used` a second before it works (its answer is
    returned), `expired` at it is refused."""
    frozen_clock(monkeypatch, end - timedelta(seconds=1))
    answer = client.post("/auth/verify-email", json={"token": used.token()})
    assert answer.status_code == 200, answer.get_json()
    frozen_clock(monkeypatch, end)
    assert_error(client.post("/auth/verify-email", json={"token": expired.token()}), 400, "INVALID_LINK")
    return answer


@TOKEN_HOURS
def test_a_verification_link_expires_after_email_token_hours(
    database_url, mail_settings, mailbox, monkeypatch, log_lines, hours
):
    app = email_app(database_url, mail_settings, hours)
    client = app.test_client()
    lifetime = timedelta(hours=hours or 24)
    issued = clock.now()
    frozen_clock(monkeypatch, issued)
    register(client, "alice")
    register(client, "bob")
    deliver(app)
    alice, bob = (mailbox.messages(f"{name}@example.com")[-1] for name in ("alice", "bob"))
    assert f"within {'24 hours' if hours is None else '3 hours'}" in alice.text
    # Both links were made at the same instant: alice's is used a second before the end.
    verify_at_the_end(monkeypatch, client, issued + lifetime, used=alice, expired=bob)
    assert [(e["kind"], e["reason"]) for e in audit_events(log_lines, "invalid_link")] == [
        ("verify_email,change_email", "expired")
    ]
    login = client.post("/auth/login", json={"username": "bob", "password": PASSWORD})
    assert login.status_code == 200 and login.get_json()["user"]["email_verified"] is False
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def required_app(mailbox, database_url):
    app = create_app(
        base_settings(
            DATABASE_URL=database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND, EMAIL_VERIFICATION="required"
        )
    )
    yield app
    with app.app_context():
        db.engine.dispose()


def test_verification_required(required_app, mailbox):
    app, client = required_app, required_app.test_client()
    response = client.post("/auth/register", json={"email": "bob@example.com", "username": "bob", "password": PASSWORD})
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"user", "email_verification_required"} and body["email_verification_required"] is True
    assert body["user"]["email_verified"] is False
    login = {"username": "bob", "password": PASSWORD}
    assert_error(client.post("/auth/login", json=login), 403, "EMAIL_NOT_VERIFIED")
    # A wrong password is still just wrong.
    assert_error(
        client.post("/auth/login", json={"username": "bob", "password": "wrong-pass-123"}), 401, "INVALID_CREDENTIALS"
    )
    deliver(app)
    # The refused login sent a new link (an expired one is no dead end); the older is void.
    first, second = mailbox.messages("bob@example.com")
    assert_error(client.post("/auth/verify-email", json={"token": first.token()}), 400, "INVALID_LINK")
    assert client.post("/auth/verify-email", json={"token": second.token()}).status_code == 200
    logged_in = client.post("/auth/login", json=login)
    assert logged_in.status_code == 200 and logged_in.get_json()["user"]["email_verified"] is True


def test_a_password_reset_verifies_the_address_in_required_mode(required_app, mailbox):
    app, client = required_app, required_app.test_client()
    client.post("/auth/register", json={"email": "bob@example.com", "username": "bob", "password": PASSWORD})
    request_reset(client, "bob@example.com")
    token = reset_token(app, mailbox, "bob@example.com")
    reset = client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert reset.status_code == 200 and reset.get_json()["user"]["email_verified"] is True
    assert client.post("/auth/login", json={"username": "bob", "password": NEW_PASSWORD}).status_code == 200


@pytest.mark.parametrize("mode", ["off"])
def test_verification_off_sends_nothing_at_register(mailbox, database_url, mode):
    app = create_app(
        base_settings(DATABASE_URL=database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND, EMAIL_VERIFICATION=mode)
    )
    client = app.test_client()
    assert "access_token" in register(client)
    assert deliver(app) == 0 and outbox_rows(app) == []
    with app.app_context():
        db.engine.dispose()


# -- Change of address ------------------------------------------------------------------


def change_email(client, tokens, new_email, password=PASSWORD):
    return client.post(
        "/auth/change-email",
        headers=bearer(tokens["access_token"]),
        json={"new_email": new_email, "current_password": password},
    )


def test_change_of_address_end_to_end(app, client, mailbox):
    tokens = register(client)
    deliver(app)
    assert_error(change_email(client, tokens, "new@example.com", "wrong-pass-123"), 401, "INVALID_CREDENTIALS")
    register(client, "carol")
    assert_error(change_email(client, tokens, "CAROL@example.com"), 409, "USER_ALREADY_EXISTS")
    assert_error(change_email(client, tokens, "alice@example.com"), 400, "VALIDATION_ERROR")
    response = change_email(client, tokens, " New@Example.com ")
    assert (response.status_code, response.get_json()) == (202, {"status": "accepted"})
    deliver(app)
    confirm = mailbox.messages("new@example.com")
    notice = [m for m in mailbox.messages("alice@example.com") if "being changed" in m.subject]
    assert len(confirm) == 1 and len(notice) == 1
    assert "new@example.com" in notice[0].text and "#token=" not in notice[0].text
    # Nothing changes until the link is used.
    me = client.get("/auth/me", headers=bearer(tokens["access_token"])).get_json()
    assert me["email"] == "alice@example.com"
    changed = client.post("/auth/verify-email", json={"token": confirm[0].token()})
    assert changed.status_code == 200
    assert changed.get_json()["email"] == "new@example.com" and changed.get_json()["email_verified"] is True
    assert client.post("/auth/login", json={"email": "new@example.com", "password": PASSWORD}).status_code == 200
    assert_error(
        client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD}),
        401,
        "INVALID_CREDENTIALS",
    )
    assert_error(client.post("/auth/verify-email", json={"token": confirm[0].token()}), 400, "INVALID_LINK")


def test_a_right_password_at_change_email_or_mfa_setup_leaves_the_failed_login_count(database_url, mail_settings):
    """Only a completed login clears the count (the contract): a right current_password at
    change-email or MFA setup, from a live session, counts as an attempt and clears nothing."""
    app = create_app(base_settings(DATABASE_URL=database_url, LOGIN_MAX_FAILURES="3", **mail_settings))
    client = app.test_client()
    actions = {
        "alice": lambda tokens: change_email(client, tokens, "new@example.com"),
        "bob": lambda tokens: client.post(
            "/auth/mfa/totp/setup", headers=bearer(tokens["access_token"]), json={"current_password": PASSWORD}
        ),
    }
    for name, action in actions.items():
        tokens = register(client, name)
        wrong = {"username": name, "password": "wrong-pass-123"}
        assert_error(client.post("/auth/login", json=wrong), 401, "INVALID_CREDENTIALS")
        assert action(tokens).status_code in (200, 202)
        assert_error(client.post("/auth/login", json=wrong), 401, "INVALID_CREDENTIALS")
        # Three attempts in the window, none cleared: locked, the right password too.
        right = {"username": name, "password": PASSWORD}
        assert_error(client.post("/auth/login", json=right), 429, "RATE_LIMITED")
    with app.app_context():
        db.engine.dispose()


def test_change_of_address_taken_meanwhile_is_409_and_spends_nothing(app, client, mailbox):
    tokens = register(client)
    assert change_email(client, tokens, "wanted@example.com").status_code == 202
    deliver(app)
    token = mailbox.messages("wanted@example.com")[-1].token()
    squatter = client.post(
        "/auth/register", json={"email": "wanted@example.com", "username": "dave", "password": PASSWORD}
    )
    assert squatter.status_code == 201
    assert_error(client.post("/auth/verify-email", json={"token": token}), 409, "USER_ALREADY_EXISTS")
    with app.app_context():
        row = db.session.scalar(select(OneTimeToken).where(OneTimeToken.kind == "change_email"))
        assert row is not None and row.used_at is None
    me = client.get("/auth/me", headers=bearer(tokens["access_token"])).get_json()
    assert me["email"] == "alice@example.com"


def test_a_verification_link_for_a_former_address_is_invalid(app, client, mailbox):
    tokens = register(client)
    deliver(app)
    old_link = mailbox.messages()[-1].token()
    change_email(client, tokens, "moved@example.com")
    deliver(app)
    assert (
        client.post("/auth/verify-email", json={"token": mailbox.messages("moved@example.com")[-1].token()}).status_code
        == 200
    )
    assert_error(client.post("/auth/verify-email", json={"token": old_link}), 400, "INVALID_LINK")


@TOKEN_HOURS
def test_a_change_of_address_link_expires_after_email_token_hours(
    database_url, mail_settings, mailbox, monkeypatch, log_lines, hours
):
    app = email_app(database_url, mail_settings, hours)
    client = app.test_client()
    lifetime = timedelta(hours=hours or 24)
    issued = clock.now()
    frozen_clock(monkeypatch, issued)
    for name in ("alice", "bob"):
        assert change_email(client, register(client, name), f"{name}.new@example.com").status_code == 202
    deliver(app)
    alice, bob = (mailbox.messages(f"{name}.new@example.com")[-1] for name in ("alice", "bob"))
    changed = verify_at_the_end(monkeypatch, client, issued + lifetime, used=alice, expired=bob)
    assert changed.get_json()["email"] == "alice.new@example.com"
    assert [e["reason"] for e in audit_events(log_lines, "invalid_link")] == ["expired"]
    # bob keeps his address.
    assert client.post("/auth/login", json={"email": "bob@example.com", "password": PASSWORD}).status_code == 200
    assert_error(
        client.post("/auth/login", json={"email": "bob.new@example.com", "password": PASSWORD}),
        401,
        "INVALID_CREDENTIALS",
    )
    with app.app_context():
        db.engine.dispose()


def test_a_newer_change_of_address_request_voids_the_older_link(app, client, mailbox):
    tokens = register(client)
    assert change_email(client, tokens, "first@example.com").status_code == 202
    assert change_email(client, tokens, "second@example.com").status_code == 202
    deliver(app)
    older = mailbox.messages("first@example.com")[-1].token()
    newer = mailbox.messages("second@example.com")[-1].token()
    assert_error(client.post("/auth/verify-email", json={"token": older}), 400, "INVALID_LINK")
    changed = client.post("/auth/verify-email", json={"token": newer})
    assert changed.status_code == 200 and changed.get_json()["email"] == "second@example.com"
    assert client.post("/auth/login", json={"email": "first@example.com", "password": PASSWORD}).status_code == 401


def accounts_with(app, address: str) -> list[str]:
    """The usernames of the accounts whose address is `address`."""
    with app.app_context():
        return list(db.session.scalars(select(User.username).where(func.lower(User.email) == address)))


@pytest.mark.parametrize("first", ["registration", "confirmation"])
def test_a_registration_racing_the_confirmation_of_a_change_to_its_address_on_postgresql(
    mailbox, pg_database_url, monkeypatch, log_lines, first
):
    """Another request registers the address while the link that moves alice to it is used.
    The interleaving is injected: with `registration` first, it commits after the link's
    request found the address free and before that request writes it (the unique index
    refuses the write: 409, nothing spent); with `confirmation` first, it tries its insert
    while the change is written but not committed (it waits, then the index refuses it:
    409). Either way one account has the address."""
    import threading

    from helpers import wait_until
    from sqlalchemy import create_engine, text

    from authapp.auth import links, verification

    app = create_app(base_settings(DATABASE_URL=pg_database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND))
    client = app.test_client()
    tokens = register(client)
    assert change_email(client, tokens, "wanted@example.com").status_code == 202
    deliver(app)
    token = mailbox.messages("wanted@example.com")[-1].token()
    registered: list[int] = []
    other = app.test_client()  # another request, in its own thread, with its own connection
    squatter = threading.Thread(
        target=lambda: registered.append(
            other.post(
                "/auth/register", json={"email": "wanted@example.com", "username": "dave", "password": PASSWORD}
            ).status_code
        )
    )
    if first == "registration":
        real_check = verification._address_taken

        def free_then_taken(db_session, address, user_id):
            taken = real_check(db_session, address, user_id)
            if not squatter.is_alive() and not registered:
                squatter.start()
                squatter.join(timeout=60)
            return taken

        monkeypatch.setattr(verification, "_address_taken", free_then_taken)
    else:
        real_void = links.void
        watcher = create_engine(pg_database_url)

        def blocked() -> bool:
            with watcher.connect() as connection:
                waiting = text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                return connection.scalar(waiting) > 0

        def written_then_raced(db_session, user_id, *kinds):
            real_void(db_session, user_id, *kinds)
            if not squatter.is_alive() and not registered:  # the address is written, not committed
                squatter.start()
                wait_until(blocked, 30, "the registration waiting on the uncommitted address")

        monkeypatch.setattr(verification.links, "void", written_then_raced)
    response = client.post("/auth/verify-email", json={"token": token})
    squatter.join(timeout=60)
    assert not squatter.is_alive()
    if first == "registration":
        assert registered == [201]
        assert_error(response, 409, "USER_ALREADY_EXISTS")
        assert accounts_with(app, "wanted@example.com") == ["dave"]
        assert accounts_with(app, "alice@example.com") == ["alice"]
        assert [e["reason"] for e in audit_events(log_lines, "email_change_failed")] == ["address_taken"]
        with app.app_context():  # the link stays unspent
            row = db.session.scalar(select(OneTimeToken).where(OneTimeToken.kind == "change_email"))
            assert row is not None and row.used_at is None
    else:
        watcher.dispose()
        assert response.status_code == 200 and response.get_json()["email"] == "wanted@example.com"
        assert registered == [409]
        assert accounts_with(app, "wanted@example.com") == ["alice"]
        with app.app_context():  # and the registration made no account
            assert db.session.scalar(select(func.count()).select_from(User)) == 1
    with app.app_context():
        db.engine.dispose()


# -- Nothing lost -----------------------------------------------------------------------


def test_nothing_is_lost_when_the_mail_server_is_down_and_the_app_restarts(mailbox, database_url, monkeypatch):
    settings = base_settings(DATABASE_URL=database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND)
    app = create_app(settings)
    client = app.test_client()
    for name in ("ann", "ben", "cat"):
        register(client, name)
    mailbox.stop()
    for name in ("ann", "ben", "cat"):
        request_reset(client, f"{name}@example.com")
    assert deliver(app) == 6  # each attempted once, each refused
    rows = outbox_rows(app)
    assert [r.status for r in rows] == ["queued"] * 6
    assert all(r.attempts == 1 and "connect" in (r.last_error or "") and r.body_text for r in rows)
    with app.app_context():
        db.engine.dispose()

    restarted = create_app(settings)
    assert deliver(restarted) == 0  # not due yet: backoff
    mailbox.start()
    real = clock.now
    monkeypatch.setattr(clock, "now", lambda: real() + timedelta(minutes=5))
    assert deliver(restarted) == 6
    assert deliver(restarted) == 0
    ids = [m.message["Message-ID"] for m in mailbox.messages()]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert sorted(r.message_id for r in outbox_rows(restarted)) == sorted(ids)
    assert all(r.status == "sent" and r.body_text is None for r in outbox_rows(restarted))
    with restarted.app_context():
        db.engine.dispose()


def test_a_database_lost_between_the_send_and_its_record_sends_the_message_again(app, client, mailbox, monkeypatch):
    """The mail server took the message, then the courier could not record it: the claim
    expires and the message goes out a second time (docs/email.md says so)."""
    from authapp.errors import AppError, ServiceUnavailable
    from authapp.mail import outbox

    register(client)  # one message: the verification link
    now = [clock.now()]
    monkeypatch.setattr(clock, "now", lambda: now[0])
    recorded = outbox.mark_sent

    def database_lost(*_args):
        raise ServiceUnavailable()

    monkeypatch.setattr(outbox, "mark_sent", database_lost)
    with app.app_context():
        worker = courier.Courier(poll_interval=0)
        with pytest.raises(AppError):  # what the courier's loop waits out
            worker.deliver_due()
    assert len(mailbox.messages()) == 1
    monkeypatch.setattr(outbox, "mark_sent", recorded)
    assert deliver(app) == 0  # still claimed
    now[0] += worker.lease + timedelta(seconds=1)
    assert deliver(app) == 1
    first, second = mailbox.messages()
    assert first.message["Message-ID"] == second.message["Message-ID"] and first.token() == second.token()
    (row,) = outbox_rows(app)
    assert row.status == "sent" and row.attempts == 2


def test_a_refusing_server_gets_retries_with_backoff_then_the_message_is_given_up(
    app, client, mailbox, monkeypatch, log_lines
):
    register(client)
    mailbox.refuse = "451 4.3.0 try again later"
    now = [clock.now()]
    monkeypatch.setattr(clock, "now", lambda: now[0])
    for _ in range(100):
        row = outbox_rows(app)[0]
        if row.status != "queued":
            break
        now[0] = max(now[0], row.next_attempt_at)
        assert deliver(app) == 1
    row = outbox_rows(app)[0]
    assert row.status == "given_up" and row.body_text is None and row.recipient is None
    assert "451" in row.last_error
    # Backoff grows: with 24 hours to try, far fewer than one attempt a minute.
    assert 5 < row.attempts < 40
    events = [e["event"] for e in log_lines() if e.get("audit")]
    assert events.count("mail_retry") == row.attempts - 1 and events.count("mail_given_up") == 1


def test_a_permanent_refusal_gives_up_at_once(app, client, mailbox):
    register(client)
    mailbox.refuse = "550 5.1.1 no such mailbox"
    deliver(app)
    row = outbox_rows(app)[0]
    assert row.status == "given_up" and row.attempts == 1 and "550" in row.last_error


def test_two_couriers_on_postgresql_never_send_one_message_twice(mailbox, pg_database_url):
    import threading

    settings = base_settings(
        DATABASE_URL=pg_database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND, MAIL_RATE_LIMIT="1000/hour"
    )
    app = create_app(settings)
    client = app.test_client()
    register(client)
    for _ in range(59):  # 60 messages with the registration's
        request_reset(client)
    couriers = [create_app(settings) for _ in range(2)]
    barrier = threading.Barrier(2)
    handled = []

    def run(each):
        barrier.wait()
        handled.append(deliver(each))

    threads = [threading.Thread(target=run, args=(each,)) for each in couriers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    ids = [m.message["Message-ID"] for m in mailbox.messages()]
    rows = outbox_rows(app)
    assert len(rows) == 60 and all(r.status == "sent" for r in rows)
    assert len(ids) == len(set(ids)) == 60 and sum(handled) == 60
    assert sorted(ids) == sorted(r.message_id for r in rows)
    for each in (app, *couriers):
        with each.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_two_couriers_on_sqlite_never_send_one_message_twice(mailbox, database_url):
    import threading

    from helpers import wait_until

    settings = base_settings(
        DATABASE_URL=database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND, MAIL_RATE_LIMIT="1000/hour"
    )
    app = create_app(settings)
    client = app.test_client()
    register(client)
    for _ in range(39):
        request_reset(client)
    couriers = [create_app(settings) for _ in range(2)]
    workers, threads = [], []
    for each in couriers:
        with each.app_context():
            workers.append(courier.Courier(poll_interval=0.01))

    def run(each, worker):
        with each.app_context():
            worker.run()  # waits out "database is locked" like any database error

    for each, worker in zip(couriers, workers, strict=True):
        threads.append(threading.Thread(target=run, args=(each, worker), daemon=True))
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(mailbox.messages()) >= 40, 60, "40 messages")
        time.sleep(0.5)  # a duplicate would arrive now
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(timeout=30)
    ids = [m.message["Message-ID"] for m in mailbox.messages()]
    assert len(ids) == len(set(ids)) == 40
    assert all(r.status == "sent" for r in outbox_rows(app))
    for each in (app, *couriers):
        with each.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_per_address_limits_on_the_new_endpoints(mailbox, database_url):
    app = create_app(
        base_settings(
            DATABASE_URL=database_url,
            MAIL_URL=mailbox.url,
            RATELIMIT_ENABLED="true",
            MAIL_REQUEST_RATE_LIMIT="2/minute",
            LOGIN_RATE_LIMIT="3/minute",
            REGISTER_RATE_LIMIT="100/minute",
        )
    )
    client = app.test_client()
    tokens = register(client)
    for _ in range(2):
        request_reset(client)
    reset_request = {"email": "alice@example.com"}
    assert_error(client.post("/auth/password-reset/request", json=reset_request), 429, "RATE_LIMITED")
    auth = bearer(tokens["access_token"])
    for _ in range(2):
        assert client.post("/auth/verify-email/request", headers=auth).status_code == 202
    assert_error(client.post("/auth/verify-email/request", headers=auth), 429, "RATE_LIMITED")
    wrong = {"new_email": "b@example.com", "current_password": "wrong-pass-123"}
    for path, body in [
        ("/auth/verify-email", {"token": "x" * 43}),
        ("/auth/password-reset", {"token": "x" * 43, "new_password": NEW_PASSWORD}),
        ("/auth/change-email", wrong),
    ]:
        for _ in range(3):
            assert client.post(path, json=body, headers=auth).status_code in (400, 401)
        assert_error(client.post(path, json=body, headers=auth), 429, "RATE_LIMITED")
    with app.app_context():
        db.engine.dispose()


# -- Links that must die, and requests that must not kill them ---------------------------


def test_a_request_over_the_limit_leaves_the_delivered_link_working(mailbox, database_url):
    """Anyone may ask for reset links for an address: past MAIL_RATE_LIMIT the request sends
    nothing, and must not void the link already in the user's inbox either."""
    app = create_app(
        base_settings(DATABASE_URL=database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND, MAIL_RATE_LIMIT="2/hour")
    )
    client = app.test_client()
    register(client)
    for _ in range(4):
        request_reset(client)
    token = reset_token(app, mailbox)  # the second one sent, the newest in the inbox
    response = client.post("/auth/password-reset", json={"token": token, "new_password": "a-brand-new-passphrase-7"})
    assert response.status_code == 200, response.get_json()
    with app.app_context():
        db.engine.dispose()


def test_verification_links_survive_logins_past_the_limit(mailbox, database_url):
    app = create_app(
        base_settings(
            DATABASE_URL=database_url,
            MAIL_URL=mailbox.url,
            FRONTEND_URL=FRONTEND,
            EMAIL_VERIFICATION="required",
            MAIL_RATE_LIMIT="2/hour",
        )
    )
    client = app.test_client()
    client.post("/auth/register", json={"email": "alice@example.com", "username": "alice", "password": PASSWORD})
    login = {"email": "alice@example.com", "password": PASSWORD}
    for _ in range(3):  # each sends a new link while the limit allows, then nothing
        assert_error(client.post("/auth/login", json=login), 403, "EMAIL_NOT_VERIFIED")
    deliver(app)
    links_sent = [m for m in mailbox.messages("alice@example.com") if "/verify-email#" in m.text]
    assert len(links_sent) == 2
    assert client.post("/auth/verify-email", json={"token": links_sent[-1].token()}).status_code == 200
    assert client.post("/auth/login", json=login).status_code == 200
    with app.app_context():
        db.engine.dispose()


def test_a_reset_link_sent_to_a_former_address_is_invalid(app, client, mailbox):
    tokens = register(client)
    request_reset(client)
    old_link = reset_token(app, mailbox)
    assert change_email(client, tokens, "new@example.com").status_code == 202
    deliver(app)
    (confirm,) = mailbox.messages("new@example.com")
    assert client.post("/auth/verify-email", json={"token": confirm.token()}).status_code == 200
    response = client.post("/auth/password-reset", json={"token": old_link, "new_password": "a-brand-new-passphrase-7"})
    assert_error(response, 400, "INVALID_LINK")


def test_a_reset_voids_a_pending_change_of_address(app, client, mailbox):
    tokens = register(client)
    assert change_email(client, tokens, "attacker@example.com").status_code == 202
    request_reset(client)
    reset_link = reset_token(app, mailbox)
    (confirm,) = mailbox.messages("attacker@example.com")
    response = client.post(
        "/auth/password-reset", json={"token": reset_link, "new_password": "a-brand-new-passphrase-7"}
    )
    assert response.status_code == 200, response.get_json()
    assert_error(client.post("/auth/verify-email", json={"token": confirm.token()}), 400, "INVALID_LINK")


def test_a_password_change_voids_pending_reset_and_change_of_address_links(app, client, mailbox):
    tokens = register(client)
    assert change_email(client, tokens, "attacker@example.com").status_code == 202
    request_reset(client)
    reset_link = reset_token(app, mailbox)
    (confirm,) = mailbox.messages("attacker@example.com")
    changed = client.post(
        "/auth/change-password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": PASSWORD, "new_password": "a-brand-new-passphrase-7"},
    )
    assert changed.status_code == 200, changed.get_json()
    assert_error(client.post("/auth/verify-email", json={"token": confirm.token()}), 400, "INVALID_LINK")
    response = client.post(
        "/auth/password-reset", json={"token": reset_link, "new_password": "yet-another-passphrase-8"}
    )
    assert_error(response, 400, "INVALID_LINK")


def test_a_reset_racing_a_deactivation_yields_no_session(app, client, mailbox, monkeypatch):
    """The operator's deactivation commits while the reset hashes the new password."""
    from authapp.auth import passwords, recovery

    register(client)
    request_reset(client)
    token = reset_token(app, mailbox)
    real_hash = passwords.hash_password

    def hash_then_deactivate(password, rounds):
        hashed = real_hash(password, rounds)
        with app.app_context(), unit_of_work() as session:
            session.execute(update(User).where(User.username == "alice").values(is_active=False))
        return hashed

    monkeypatch.setattr(recovery.passwords, "hash_password", hash_then_deactivate)
    response = client.post("/auth/password-reset", json={"token": token, "new_password": "a-brand-new-passphrase-7"})
    assert_error(response, 400, "INVALID_LINK")
    with app.app_context():
        sessions_made = db.session.scalar(select(func.count()).select_from(AuthSession))
        stored = db.session.scalar(select(User.hashed_password).where(User.username == "alice"))
    assert sessions_made == 1  # the registration's only: the reset started none
    assert passwords.verify_password(PASSWORD, stored)  # and stored no new password


# -- The audit trail --------------------------------------------------------------------


def user_id_of(app, username: str) -> int:
    with app.app_context():
        return db.session.scalar(select(User.id).where(User.username == username))


def test_the_reset_flow_writes_its_audit_events(app, client, mailbox, cli_runner, log_lines):
    register(client)
    register(client, "bob")
    for _ in range(4):  # three links sent (MAIL_RATE_LIMIT, 3/hour), then nothing
        request_reset(client)
    request_reset(client, "nobody@example.com")
    assert cli_runner("users", "deactivate", "bob").exit_code == 0
    request_reset(client, "bob@example.com")
    alice = user_id_of(app, "alice")
    requested = [(e["user_id"], e["outcome"]) for e in audit_events(log_lines, "password_reset_requested")]
    assert requested == [(alice, "queued")] * 3 + [
        (alice, "rate_limited"),
        (None, "no_account"),
        (user_id_of(app, "bob"), "inactive_user"),
    ]
    # Only the request past the limit says so: no account, or an inactive one, leaves no mail event.
    suppressed = [(e["user_id"], e["kind"], e["reason"]) for e in audit_events(log_lines, "mail_suppressed")]
    assert suppressed == [(alice, "password_reset", "rate_limited")]

    token = reset_token(app, mailbox)
    response = client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert response.status_code == 200, response.get_json()
    (reset,) = audit_events(log_lines, "password_reset")
    assert (reset["user_id"], reset["sid"], reset["sessions_revoked"]) == (alice, sid_of(response.get_json()), 1)
    queued = [e["kind"] for e in audit_events(log_lines, "mail_queued")]
    assert queued == ["verify_email"] * 2 + ["password_reset"] * 3 + ["password_changed"]
    assert token not in repr(log_lines())


def test_verification_and_change_of_address_write_their_audit_events(app, client, mailbox, log_lines):
    tokens = register(client)
    register(client, "carol")
    alice, sid = user_id_of(app, "alice"), sid_of(tokens)
    auth = bearer(tokens["access_token"])
    for _ in range(3):  # the registration's link and two more, then MAIL_RATE_LIMIT (3/hour)
        assert client.post("/auth/verify-email/request", headers=auth).status_code == 202
    deliver(app)
    link = mailbox.messages("alice@example.com")[-1].token()
    assert client.post("/auth/verify-email", json={"token": link}).status_code == 200
    assert client.post("/auth/verify-email/request", headers=auth).status_code == 202  # verified already
    requested = [
        (e["user_id"], e["sid"], e["outcome"]) for e in audit_events(log_lines, "email_verification_requested")
    ]
    assert requested == [(alice, sid, "queued")] * 2 + [(alice, sid, "rate_limited"), (alice, sid, "verified")]
    assert [(e["kind"], e["reason"]) for e in audit_events(log_lines, "mail_suppressed")] == [
        ("verify_email", "rate_limited")
    ]
    assert [e["user_id"] for e in audit_events(log_lines, "email_verified")] == [alice]

    assert change_email(client, tokens, "new@example.com", "wrong-pass-123").status_code == 401
    assert change_email(client, tokens, "carol@example.com").status_code == 409
    assert change_email(client, tokens, "new@example.com").status_code == 202
    failed = [(e["user_id"], e["sid"], e["reason"]) for e in audit_events(log_lines, "email_change_failed")]
    assert failed == [(alice, sid, "wrong_password"), (alice, sid, "address_taken")]
    assert [(e["user_id"], e["sid"]) for e in audit_events(log_lines, "email_change_requested")] == [(alice, sid)]
    deliver(app)
    confirm = mailbox.messages("new@example.com")[-1].token()
    assert client.post("/auth/verify-email", json={"token": confirm}).status_code == 200
    assert [e["user_id"] for e in audit_events(log_lines, "email_changed")] == [alice]
    assert len(audit_events(log_lines, "email_verified")) == 1  # a change is email_changed only
    assert link not in repr(log_lines()) and confirm not in repr(log_lines())


def test_every_refused_link_is_audited_with_its_reason(app, client, mailbox, cli_runner, log_lines):
    register(client)
    register(client, "bob")
    deliver(app)
    alice_link = mailbox.messages("alice@example.com")[-1].token()
    bob_link = mailbox.messages("bob@example.com")[-1].token()
    request_reset(client)
    reset_link = reset_token(app, mailbox)

    def refused(path: str, token: str) -> None:
        body = {"token": token} if path == "/auth/verify-email" else {"token": token, "new_password": NEW_PASSWORD}
        assert_error(client.post(path, json=body), 400, "INVALID_LINK")

    refused("/auth/verify-email", "A" * 500)  # longer than any token
    refused("/auth/verify-email", "A" * 43)  # no such token
    refused("/auth/password-reset", alice_link)  # a token of another kind
    assert client.post("/auth/verify-email", json={"token": alice_link}).status_code == 200
    refused("/auth/verify-email", alice_link)
    # The address changed by another way than a link (which would have voided the reset link).
    with app.app_context(), unit_of_work() as session:
        session.execute(update(User).where(User.username == "alice").values(email="alice@elsewhere.example"))
    refused("/auth/password-reset", reset_link)
    assert cli_runner("users", "deactivate", "bob").exit_code == 0
    refused("/auth/verify-email", bob_link)
    events = [(e["kind"], e["reason"]) for e in audit_events(log_lines, "invalid_link")]
    assert events == [
        ("verify_email,change_email", "malformed"),
        ("verify_email,change_email", "unknown"),
        ("password_reset", "unknown"),
        ("verify_email,change_email", "used"),
        ("password_reset", "address_changed"),
        ("verify_email", "inactive_user"),
    ]
    every_line = repr(log_lines())
    assert not any(token in every_line for token in (alice_link, bob_link, reset_link))


def test_a_reset_with_mfa_on_leaves_the_failed_login_count_to_the_second_factor(mailbox, database_url, monkeypatch):
    """Without MFA a reset clears the lockout (see the test of the reset above); with MFA on
    it answers a challenge and clears nothing: the second step clears the count, and while
    the account is locked that step is refused too."""
    import pyotp

    app = create_app(
        base_settings(DATABASE_URL=database_url, MAIL_URL=mailbox.url, FRONTEND_URL=FRONTEND, LOGIN_MAX_FAILURES="3")
    )
    client = app.test_client()
    now = [clock.now() - timedelta(minutes=20)]  # behind the real clock, which PyJWT checks tokens with
    monkeypatch.setattr(clock, "now", lambda: now[0])
    tokens = register(client)
    auth = bearer(tokens["access_token"])
    secret = client.post("/auth/mfa/totp/setup", headers=auth, json={"current_password": PASSWORD}).get_json()["secret"]
    totp = pyotp.TOTP(secret)
    assert client.post("/auth/mfa/totp/enable", headers=auth, json={"code": totp.at(now[0])}).status_code == 200
    now[0] += timedelta(seconds=90)  # past the step of the code that enabled it
    for _ in range(3):
        client.post("/auth/login", json={"username": "alice", "password": "not-the-password-1"})
    assert_error(client.post("/auth/login", json={"username": "alice", "password": PASSWORD}), 429, "RATE_LIMITED")

    request_reset(client)
    response = client.post(
        "/auth/password-reset", json={"token": reset_token(app, mailbox), "new_password": NEW_PASSWORD}
    )
    assert response.status_code == 200 and response.get_json()["mfa_required"] is True
    second_step = {"mfa_token": response.get_json()["mfa_token"], "code": totp.at(now[0])}
    assert_error(client.post("/auth/mfa/verify", json=second_step), 429, "RATE_LIMITED")
    login = {"username": "alice", "password": NEW_PASSWORD}
    assert_error(client.post("/auth/login", json=login), 429, "RATE_LIMITED")
    now[0] += timedelta(seconds=901)  # LOGIN_FAILURE_WINDOW (900 s) passes
    challenge = client.post("/auth/login", json=login).get_json()
    verified = client.post("/auth/mfa/verify", json={"mfa_token": challenge["mfa_token"], "code": totp.at(now[0])})
    assert verified.status_code == 200 and verified.get_json()["aal"] == "aal2"
    with app.app_context():
        db.engine.dispose()
