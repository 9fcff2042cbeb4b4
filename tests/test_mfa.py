"""Multi-factor authentication (TOTP, RFC 6238) over HTTP, on SQLite and PostgreSQL: setup
and enable, the two-step login, drift, single use of codes, recovery codes and challenges,
the lockout, the session levels, disable, the operator's reset, races, and that no secret,
recovery code or challenge token is ever logged or answered again."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pyotp
import pytest
from helpers import PASSWORD, assert_error, base_settings, bearer, http, live_server, post_json, sid_of
from sqlalchemy import select, update

from authapp import clock, create_app
from authapp.auth import links, mfa, passwords
from authapp.auth import tokens as token_service
from authapp.database import unit_of_work
from authapp.extensions import db
from authapp.models import AuthSession, MfaRecoveryCode, MfaTotp

NEW_PASSWORD = "granite-meadow-lantern-7"
STEP = 30


@dataclass
class Clock:
    """The service's clock, frozen and moved by hand (PyJWT keeps the real one: the start
    lies 15 minutes back, so every token minted here is valid for the real clock)."""

    current: datetime

    def now(self) -> datetime:
        return self.current

    def move(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


@pytest.fixture
def frozen(monkeypatch) -> Clock:
    real = datetime.now(UTC) - timedelta(minutes=15)
    # 5 s into a step, so that a move of a few seconds stays in it.
    start = datetime.fromtimestamp((int(real.timestamp()) // STEP) * STEP + 5, UTC)
    fixed = Clock(start)
    monkeypatch.setattr(clock, "now", fixed.now)
    return fixed


def code_at(secret: str, when: datetime, offset: int = 0) -> str:
    return pyotp.TOTP(secret).at(when, counter_offset=offset)


def refused_code(secret: str, when: datetime, offset: int) -> str:
    """The code `offset` steps from `when` (at least two away), a code the app must refuse;
    on the rare secret whose code there is also that of a step within one of `when` (three
    in a million), the code of the next step further out."""
    accepted = {code_at(secret, when, drift) for drift in (-1, 0, 1)}
    while (code := code_at(secret, when, offset)) in accepted:
        offset += 1 if offset > 0 else -1
    return code


def login(client, username="alice", password=PASSWORD):
    return client.post("/auth/login", json={"username": username, "password": password})


def challenge(client, username="alice", password=PASSWORD) -> str:
    response = login(client, username, password)
    body = response.get_json()
    assert response.status_code == 200, body
    assert set(body) == {"mfa_required", "mfa_token", "expires_in"}, body
    assert body["mfa_required"] is True and body["expires_in"] == 300
    return body["mfa_token"]


def verify(client, token: str, **factor: str):
    return client.post("/auth/mfa/verify", json={"mfa_token": token, **factor})


def setup(client, access: str, password: str = PASSWORD):
    return client.post("/auth/mfa/totp/setup", headers=bearer(access), json={"current_password": password})


@dataclass
class Enabled:
    secret: str
    recovery_codes: list[str]
    access: str
    refresh: str
    enabled_at: datetime


def enable_mfa(client, tokens: dict[str, Any], frozen: Clock) -> Enabled:
    access = tokens["access_token"]
    response = setup(client, access)
    assert response.status_code == 200, response.get_json()
    secret = response.get_json()["secret"]
    enabled = client.post("/auth/mfa/totp/enable", headers=bearer(access), json={"code": code_at(secret, frozen.now())})
    assert enabled.status_code == 200, enabled.get_json()
    codes = enabled.get_json()["recovery_codes"]
    at = frozen.now()
    # Past the step the enable code used (and its drift window).
    frozen.move(3 * STEP)
    return Enabled(secret, codes, access, tokens["refresh_token"], at)


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# -- Setup and enable ---------------------------------------------------------------------


def test_setup_gives_a_secret_an_otpauth_uri_and_a_qr_code(client, tokens, frozen):
    response = setup(client, tokens["access_token"])
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"secret", "otpauth_uri", "qr_svg"}
    assert re.fullmatch(r"[A-Z2-7]{32}", body["secret"])
    assert body["otpauth_uri"] == pyotp.TOTP(body["secret"]).provisioning_uri(
        name="alice@example.com", issuer_name="authapp"
    )
    assert body["otpauth_uri"].startswith("otpauth://totp/authapp:alice%40example.com?secret=")
    assert "issuer=authapp" in body["otpauth_uri"]
    assert body["qr_svg"].startswith("<svg") and body["qr_svg"].rstrip().endswith("</svg>")
    # Pending: MFA is not on yet, and login still gives tokens.
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).get_json()["mfa_enabled"] is False
    assert "access_token" in login(client).get_json()


@pytest.mark.parametrize("settings", [{"MFA_ISSUER": "Example Corp"}])
def test_the_issuer_is_a_setting(client, tokens):
    uri = setup(client, tokens["access_token"]).get_json()["otpauth_uri"]
    assert uri.startswith("otpauth://totp/Example%20Corp:alice%40example.com?") and "issuer=Example%20Corp" in uri


def test_setup_needs_the_current_password_and_a_wrong_one_counts_as_a_failed_login(app, client, tokens, log_lines):
    assert_error(setup(client, tokens["access_token"], "wrong-password-123"), 401, "INVALID_CREDENTIALS")
    failed = [line for line in log_lines() if line.get("event") == "mfa_change_failed"]
    assert [(f["reason"], f["action"]) for f in failed] == [("wrong_password", "setup")]
    with app.app_context():
        assert db.session.scalar(select(MfaTotp).where(MfaTotp.user_id == 1)) is None
    # Counted on the account's lockout: with LOGIN_MAX_FAILURES=10, nine more guesses lock it.
    for _ in range(9):
        setup(client, tokens["access_token"], "wrong-password-123")
    assert_error(setup(client, tokens["access_token"]), 429, "RATE_LIMITED")


def test_a_new_setup_replaces_the_pending_one(client, tokens, frozen):
    first = setup(client, tokens["access_token"]).get_json()["secret"]
    second = setup(client, tokens["access_token"]).get_json()["secret"]
    assert first != second
    stale = client.post(
        "/auth/mfa/totp/enable", headers=bearer(tokens["access_token"]), json={"code": code_at(first, frozen.now())}
    )
    assert_error(stale, 400, "VALIDATION_ERROR")
    fresh = client.post(
        "/auth/mfa/totp/enable", headers=bearer(tokens["access_token"]), json={"code": code_at(second, frozen.now())}
    )
    assert fresh.status_code == 200


@pytest.mark.parametrize("code", ["12345", "1234567", "abcdef", "١٢٣٤٥٦", " 123456", 123456, None])
def test_enable_refuses_a_code_that_is_not_six_digits(client, tokens, code):
    setup(client, tokens["access_token"])
    body = assert_error(
        client.post("/auth/mfa/totp/enable", headers=bearer(tokens["access_token"]), json={"code": code}),
        400,
        "VALIDATION_ERROR",
    )
    assert "code" in body["errors"]


def test_enable_refuses_a_wrong_code_and_a_missing_setup(client, tokens, frozen):
    access = tokens["access_token"]
    no_setup = client.post("/auth/mfa/totp/enable", headers=bearer(access), json={"code": "123456"})
    assert "code" in assert_error(no_setup, 400, "VALIDATION_ERROR")["errors"]
    secret = setup(client, access).get_json()["secret"]
    wrong = refused_code(secret, frozen.now(), 5)
    body = assert_error(
        client.post("/auth/mfa/totp/enable", headers=bearer(access), json={"code": wrong}), 400, "VALIDATION_ERROR"
    )
    assert "code" in body["errors"]
    assert client.get("/auth/me", headers=bearer(access)).get_json()["mfa_enabled"] is False


def enable_code(client, access: str, code: str):
    return client.post("/auth/mfa/totp/enable", headers=bearer(access), json={"code": code})


@pytest.mark.parametrize("settings", [{"LOGIN_MAX_FAILURES": "4"}])
def test_wrong_enable_codes_count_on_the_account_lockout(client, tokens, frozen, log_lines):
    access = tokens["access_token"]
    # 1: the right password counts as an attempt and clears nothing (only a login does)
    secret = setup(client, access).get_json()["secret"]
    wrong = refused_code(secret, frozen.now(), 7)
    for _ in range(3):  # 2, 3, 4: still the contract's 400 for a wrong code
        assert_error(enable_code(client, access, wrong), 400, "VALIDATION_ERROR")
    # Then the account is locked, for the right code as for a login.
    locked = enable_code(client, access, code_at(secret, frozen.now()))
    assert_error(locked, 429, "RATE_LIMITED")
    assert 1 <= int(locked.headers["Retry-After"]) <= 900
    assert_error(login(client), 429, "RATE_LIMITED")
    assert client.get("/auth/me", headers=bearer(access)).get_json()["mfa_enabled"] is False
    events = [line for line in log_lines() if line.get("event") == "mfa_enable_failed"]
    assert len(events) == 3 and all(line["reason"] == "wrong_code" for line in events)
    frozen.move(901)  # the window passes
    again = setup(client, access).get_json()["secret"]
    assert enable_code(client, access, code_at(again, frozen.now())).status_code == 200


def test_only_the_session_that_set_up_the_secret_can_enable_it(client, tokens, frozen):
    first = tokens["access_token"]
    other = login(client).get_json()["access_token"]
    secret = setup(client, first).get_json()["secret"]
    # Another session (a stolen token, without the password): no pending setup for it.
    refused = assert_error(enable_code(client, other, code_at(secret, frozen.now())), 400, "VALIDATION_ERROR")
    assert "No TOTP setup is pending" in refused["errors"]["code"][0]
    assert client.get("/auth/me", headers=bearer(first)).status_code == 200
    assert client.get("/auth/me", headers=bearer(other)).get_json()["mfa_enabled"] is False
    assert enable_code(client, first, code_at(secret, frozen.now())).status_code == 200
    assert_error(client.get("/auth/me", headers=bearer(other)), 401, "TOKEN_REVOKED")


def test_a_pending_setup_expires_after_ten_minutes(client, tokens, frozen):
    access = tokens["access_token"]
    secret = setup(client, access).get_json()["secret"]
    frozen.move(601)
    refused = assert_error(enable_code(client, access, code_at(secret, frozen.now())), 400, "VALIDATION_ERROR")
    assert "expired" in refused["errors"]["code"][0]
    # A new setup can be enabled within the ten minutes.
    again = setup(client, access).get_json()["secret"]
    frozen.move(590)
    assert enable_code(client, access, code_at(again, frozen.now())).status_code == 200


def test_enable_turns_mfa_on_raises_this_session_and_ends_every_other(app, client, tokens, frozen):
    other = login(client).get_json()
    enabled = enable_mfa(client, tokens, frozen)
    assert len(enabled.recovery_codes) == 10 and len(set(enabled.recovery_codes)) == 10
    assert all(re.fullmatch(r"[a-z2-7]{4}(-[a-z2-7]{4}){5}", code) for code in enabled.recovery_codes)
    me = client.get("/auth/me", headers=bearer(enabled.access))
    assert me.status_code == 200 and me.get_json()["mfa_enabled"] is True
    assert_error(client.get("/auth/me", headers=bearer(other["access_token"])), 401, "TOKEN_REVOKED")
    assert_error(client.post("/auth/refresh", json={"refresh_token": other["refresh_token"]}), 401, "TOKEN_REVOKED")
    listed = client.get("/auth/sessions", headers=bearer(enabled.access)).get_json()["sessions"]
    assert [(s["aal"], s["amr"], s["current"]) for s in listed] == [("aal2", ["pwd", "otp"], True)]
    # The session is aal2 at once; its next refresh says so in the token too.
    refreshed = client.post("/auth/refresh", json={"refresh_token": enabled.refresh}).get_json()
    assert refreshed["aal"] == "aal2"
    assert claims(refreshed["access_token"])["aal"] == "aal2"
    assert claims(refreshed["access_token"])["amr"] == ["pwd", "otp"]
    assert_error(setup(client, enabled.access), 409, "MFA_ALREADY_ENABLED")
    again = client.post("/auth/mfa/totp/enable", headers=bearer(enabled.access), json={"code": "123456"})
    assert_error(again, 409, "MFA_ALREADY_ENABLED")
    with app.app_context():
        row = db.session.get(MfaTotp, 1)
        assert row.enabled_at is not None and row.last_used_step is not None


# -- The two-step login -------------------------------------------------------------------


def test_login_with_mfa_answers_a_challenge_then_verify_gives_an_aal2_session(app, client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    before = client.get("/auth/me", headers=bearer(enabled.access)).get_json()["last_login"]
    token = challenge(client)
    # The password alone changed nothing: no login recorded, no session started.
    assert client.get("/auth/me", headers=bearer(enabled.access)).get_json()["last_login"] == before
    with app.app_context():
        assert len(db.session.scalars(select(AuthSession.id).where(AuthSession.revoked_at.is_(None))).all()) == 1
    response = verify(client, token, code=code_at(enabled.secret, frozen.now()))
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["aal"] == "aal2" and body["token_type"] == "bearer"
    assert body["user"]["mfa_enabled"] is True and body["user"]["last_login"] is not None
    access = claims(body["access_token"])
    assert access["aal"] == "aal2" and access["amr"] == ["pwd", "otp"]
    assert client.get("/auth/me", headers=bearer(body["access_token"])).status_code == 200
    refreshed = client.post("/auth/refresh", json={"refresh_token": body["refresh_token"]}).get_json()
    assert claims(refreshed["access_token"])["aal"] == "aal2" and refreshed["aal"] == "aal2"
    with app.app_context():
        assert db.session.get(AuthSession, sid_of(body)).aal == "aal2"


def test_login_by_email_with_mfa_answers_a_challenge_too(client, tokens, frozen):
    enable_mfa(client, tokens, frozen)
    body = client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD}).get_json()
    assert body["mfa_required"] is True and "access_token" not in body


def test_one_step_of_drift_either_way_is_accepted_two_are_refused(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    now = frozen.now()
    for offset in (-2, 2):
        assert_error(
            verify(client, challenge(client), code=refused_code(enabled.secret, now, offset)), 401, "INVALID_MFA_CODE"
        )
    # Steps only go forward: the earlier one first.
    assert verify(client, challenge(client), code=code_at(enabled.secret, now, -1)).status_code == 200
    assert verify(client, challenge(client), code=code_at(enabled.secret, now, 1)).status_code == 200


def test_a_code_is_accepted_once(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    code = code_at(enabled.secret, frozen.now())
    assert verify(client, challenge(client), code=code).status_code == 200
    assert_error(verify(client, challenge(client), code=code), 401, "INVALID_MFA_CODE")
    # Once used, a code of an earlier step is refused too; the next step's code works.
    assert_error(
        verify(client, challenge(client), code=code_at(enabled.secret, frozen.now(), -1)), 401, "INVALID_MFA_CODE"
    )
    frozen.move(STEP)
    assert verify(client, challenge(client), code=code_at(enabled.secret, frozen.now())).status_code == 200


def test_the_code_that_enabled_mfa_does_not_log_in(client, tokens, frozen):
    access = tokens["access_token"]
    secret = setup(client, access).get_json()["secret"]
    code = code_at(secret, frozen.now())
    assert client.post("/auth/mfa/totp/enable", headers=bearer(access), json={"code": code}).status_code == 200
    assert_error(verify(client, challenge(client), code=code), 401, "INVALID_MFA_CODE")


def test_recovery_codes_work_once_each(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    first, second = enabled.recovery_codes[:2]
    response = verify(client, challenge(client), recovery_code=first)
    assert response.status_code == 200
    assert claims(response.get_json()["access_token"])["aal"] == "aal2"
    assert_error(verify(client, challenge(client), recovery_code=first), 401, "INVALID_MFA_CODE")
    # Case, spaces and dashes do not matter.
    assert verify(client, challenge(client), recovery_code=f" {second.replace('-', '').upper()} ").status_code == 200
    assert_error(verify(client, challenge(client), recovery_code="aaaa-bbbb-cccc-dddd"), 401, "INVALID_MFA_CODE")


def test_a_challenge_is_single_use(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    token = challenge(client)
    assert_error(verify(client, token, code=refused_code(enabled.secret, frozen.now(), 7)), 401, "INVALID_MFA_CODE")
    # A wrong code does not spend it; a right one does.
    assert verify(client, token, code=code_at(enabled.secret, frozen.now())).status_code == 200
    frozen.move(STEP)
    assert_error(verify(client, token, code=code_at(enabled.secret, frozen.now())), 401, "INVALID_TOKEN")
    assert_error(verify(client, token, recovery_code=enabled.recovery_codes[0]), 401, "INVALID_TOKEN")


def test_a_challenge_expires_after_five_minutes(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    token = challenge(client)
    frozen.move(301)
    assert_error(verify(client, token, code=code_at(enabled.secret, frozen.now())), 401, "INVALID_TOKEN")
    token = challenge(client)
    frozen.move(299)
    assert verify(client, token, code=code_at(enabled.secret, frozen.now())).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"mfa_token": "x"},
        {"mfa_token": "x", "code": "123456", "recovery_code": "abcd"},
        {"code": "123456"},
        {"mfa_token": "x", "code": "12345"},
        {"mfa_token": "x", "recovery_code": "a" * 65},
        {"mfa_token": "x", "code": "123456", "extra": 1},
    ],
)
def test_verify_validates_its_body(client, body):
    assert_error(client.post("/auth/mfa/verify", json=body), 400, "VALIDATION_ERROR")


@pytest.mark.parametrize("token", ["", "x", "A" * 43, "A" * 500])
def test_unknown_challenges_are_invalid_tokens(client, tokens, frozen, token):
    assert_error(verify(client, token, code="123456"), 401, "INVALID_TOKEN")


@pytest.mark.parametrize("settings", [{"LOGIN_MAX_FAILURES": "6"}])
def test_wrong_codes_count_on_the_account_lockout_cleared_only_after_the_second_factor(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)  # 1, 2: the setup's password, the enabling code
    wrong = refused_code(enabled.secret, frozen.now(), 7)
    token = challenge(client)  # 3
    assert_error(verify(client, token, code=wrong), 401, "INVALID_MFA_CODE")  # 4
    token = challenge(client)  # 5: the right password does not clear the count
    assert_error(verify(client, token, code=wrong), 401, "INVALID_MFA_CODE")  # 6
    locked = verify(client, token, code=code_at(enabled.secret, frozen.now()))
    assert_error(locked, 429, "RATE_LIMITED")
    assert 1 <= int(locked.headers["Retry-After"]) <= 900
    assert_error(login(client), 429, "RATE_LIMITED")
    frozen.move(901)  # the window passes (the tokens stay valid: the clock is behind)
    token = challenge(client)  # 1
    assert verify(client, token, code=code_at(enabled.secret, frozen.now())).status_code == 200  # 2, then cleared
    token = challenge(client)  # 1: the count began again
    for _ in range(5):  # 2, 3, 4, 5, 6
        assert_error(verify(client, token, code=wrong), 401, "INVALID_MFA_CODE")
    assert_error(verify(client, token, code=wrong), 429, "RATE_LIMITED")


def test_a_challenge_opens_no_protected_route_and_is_no_refresh_token(app, client, tokens, frozen):
    enable_mfa(client, tokens, frozen)
    token = challenge(client)
    spec = client.get("/openapi.json").get_json()
    secured = {
        (path, method.upper())
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if isinstance(operation, dict) and operation.get("security")
    }
    checked = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if (path, method) not in secured:
                continue
            url = rule.rule.replace("<uuid:session_id>", "00000000-0000-4000-8000-000000000000")
            response = client.open(url, method=method, headers=bearer(token), json={})
            assert_error(response, 401, "INVALID_TOKEN")
            checked.add((path, method))
    assert checked == secured
    assert {("/auth/me", "GET"), ("/auth/mfa/disable", "POST"), ("/auth/mfa/recovery-codes", "POST")} <= checked
    assert_error(client.post("/auth/refresh", json={"refresh_token": token}), 401, "INVALID_TOKEN")
    assert_error(client.post("/auth/logout", headers=bearer(token)), 401, "INVALID_TOKEN")


def test_a_deactivation_or_a_password_change_after_the_challenge_gives_no_session(app, client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    runner = app.test_cli_runner()
    token = challenge(client)
    assert (
        runner.invoke(args=["users", "set-password", "alice", "--password-stdin"], input=NEW_PASSWORD + "\n").exit_code
        == 0
    )
    assert_error(verify(client, token, code=code_at(enabled.secret, frozen.now())), 401, "INVALID_CREDENTIALS")
    token = challenge(client, password=NEW_PASSWORD)
    assert runner.invoke(args=["users", "deactivate", "alice"]).exit_code == 0
    assert_error(verify(client, token, code=code_at(enabled.secret, frozen.now())), 401, "INVALID_CREDENTIALS")


def test_a_password_reset_on_an_mfa_account_answers_the_challenge(app, client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    with app.app_context(), unit_of_work() as session:
        reset_token = links.issue(
            session, links.PASSWORD_RESET, 1, "alice@example.com", clock.now(), timedelta(hours=1)
        )
    response = client.post("/auth/password-reset", json={"token": reset_token, "new_password": NEW_PASSWORD})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == {"mfa_required", "mfa_token", "expires_in"} and body["mfa_required"] is True
    # Every session ended, the new password set, the second factor still asked for.
    assert_error(client.get("/auth/me", headers=bearer(enabled.access)), 401, "TOKEN_REVOKED")
    assert challenge(client, password=NEW_PASSWORD)
    session = verify(client, body["mfa_token"], code=code_at(enabled.secret, frozen.now()))
    assert session.status_code == 200 and session.get_json()["aal"] == "aal2"


# -- Levels, new recovery codes, disable --------------------------------------------------


def regenerate(client, access, password=PASSWORD):
    return client.post("/auth/mfa/recovery-codes", headers=bearer(access), json={"current_password": password})


def disable(client, access, password=PASSWORD):
    return client.post("/auth/mfa/disable", headers=bearer(access), json={"current_password": password})


def test_an_aal1_session_can_neither_disable_mfa_nor_get_new_codes(app, client, tokens, frozen):
    # Without MFA every session is aal1.
    assert_error(disable(client, tokens["access_token"]), 403, "MFA_REQUIRED")
    assert_error(regenerate(client, tokens["access_token"]), 403, "MFA_REQUIRED")
    # With MFA on, a session at aal1 (one left from before, say) is refused too, though its
    # password is right: the session row's level counts.
    enabled = enable_mfa(client, tokens, frozen)
    with app.app_context():
        db.session.execute(update(AuthSession).values(aal="aal1", amr="pwd"))
        db.session.commit()
    assert_error(disable(client, enabled.access), 403, "MFA_REQUIRED")
    assert_error(regenerate(client, enabled.access), 403, "MFA_REQUIRED")
    assert client.get("/auth/me", headers=bearer(enabled.access)).get_json()["mfa_enabled"] is True


def test_the_session_that_enabled_mfa_is_aal2_at_once_though_its_token_says_aal1(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    assert claims(enabled.access)["aal"] == "aal1"
    response = regenerate(client, enabled.access)
    assert response.status_code == 200


def test_new_recovery_codes_void_the_old_ones(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    assert_error(regenerate(client, enabled.access, "wrong-password-123"), 401, "INVALID_CREDENTIALS")
    fresh = regenerate(client, enabled.access).get_json()["recovery_codes"]
    assert len(fresh) == 10 and not set(fresh) & set(enabled.recovery_codes)
    assert_error(verify(client, challenge(client), recovery_code=enabled.recovery_codes[0]), 401, "INVALID_MFA_CODE")
    assert verify(client, challenge(client), recovery_code=fresh[0]).status_code == 200


def test_disable_turns_mfa_off_and_ends_every_other_session(app, client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    other = verify(client, challenge(client), code=code_at(enabled.secret, frozen.now())).get_json()
    assert_error(disable(client, enabled.access, "wrong-password-123"), 401, "INVALID_CREDENTIALS")
    response = disable(client, enabled.access)
    assert response.status_code == 204 and response.data == b""
    assert_error(client.get("/auth/me", headers=bearer(other["access_token"])), 401, "TOKEN_REVOKED")
    me = client.get("/auth/me", headers=bearer(enabled.access))
    assert me.status_code == 200 and me.get_json()["mfa_enabled"] is False
    assert "access_token" in login(client).get_json()
    assert_error(disable(client, enabled.access), 409, "MFA_NOT_ENABLED")
    assert_error(regenerate(client, enabled.access), 409, "MFA_NOT_ENABLED")
    with app.app_context():
        assert db.session.scalars(select(MfaTotp)).all() == []
        assert db.session.scalars(select(MfaRecoveryCode)).all() == []
    # And on again, with a new secret.
    assert setup(client, enabled.access).status_code == 200


def test_a_challenge_given_before_mfa_was_turned_off_gives_no_session(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    token = challenge(client)
    assert disable(client, enabled.access).status_code == 204
    assert_error(verify(client, token, code=code_at(enabled.secret, frozen.now())), 401, "INVALID_TOKEN")


# -- The operator's reset -----------------------------------------------------------------


def test_flask_users_reset_mfa(app, client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["users", "reset-mfa", "alice"])
    assert result.exit_code == 0, result.output
    assert "MFA turned off for user 1 alice; 1 session(s) revoked" in result.output
    assert_error(client.get("/auth/me", headers=bearer(enabled.access)), 401, "TOKEN_REVOKED")
    body = login(client).get_json()
    assert "access_token" in body and body["user"]["mfa_enabled"] is False
    again = runner.invoke(args=["users", "reset-mfa", "alice@example.com"])
    assert again.exit_code == 0 and "MFA was not on for user 1 alice; 1 session(s) revoked" in again.output
    unknown = runner.invoke(args=["users", "reset-mfa", "nobody"])
    assert unknown.exit_code == 1 and "No user matches 'nobody'" in unknown.output
    assert "Usage:" in runner.invoke(args=["users", "reset-mfa", "--help"]).output


# -- Nothing secret leaks ---------------------------------------------------------------


def test_secret_codes_and_challenges_are_never_logged_nor_answered_again(app, client, tokens, frozen, log_lines):
    other = login(client).get_json()
    enabled = enable_mfa(client, tokens, frozen)
    token = challenge(client)
    assert_error(verify(client, token, code=refused_code(enabled.secret, frozen.now(), 9)), 401, "INVALID_MFA_CODE")
    session = verify(client, token, code=code_at(enabled.secret, frozen.now())).get_json()
    used = verify(client, challenge(client), recovery_code=enabled.recovery_codes[0]).get_json()
    access = session["access_token"]
    answers = [
        client.get("/auth/me", headers=bearer(access)),
        client.get("/auth/sessions", headers=bearer(access)),
        setup(client, access),
        client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]}),
        client.post("/auth/refresh", json={"refresh_token": other["refresh_token"]}),
        login(client),
        client.get("/metrics"),
    ]
    texts = [response.get_data(as_text=True) for response in answers] + [json.dumps(session), json.dumps(used)]
    logged = "\n".join(json.dumps(line) for line in log_lines())
    assert "mfa_enabled" in logged and "recovery_code_used" in logged and "mfa_challenge_failed" in logged
    secrets = [enabled.secret, enabled.secret.lower(), token, *enabled.recovery_codes]
    secrets += [code.replace("-", "") for code in enabled.recovery_codes]
    for secret in secrets:
        assert secret not in logged
        for text in texts:
            assert secret not in text
    with app.app_context():
        row = db.session.get(MfaTotp, 1)
        assert enabled.secret.encode() not in row.secret_sealed
        stored = {code.code_hash for code in db.session.scalars(select(MfaRecoveryCode))}
        assert len(stored) == 10 and not stored & set(enabled.recovery_codes)


def test_the_mfa_metrics_count_each_outcome(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    token = challenge(client)
    verify(client, token, code=refused_code(enabled.secret, frozen.now(), 9))
    verify(client, token, code=code_at(enabled.secret, frozen.now()))
    verify(client, challenge(client), recovery_code=enabled.recovery_codes[0])
    text = client.get("/metrics").get_data(as_text=True)
    for outcome, value in (
        ("enabled", 1),
        ("challenged", 2),
        ("failed", 1),
        ("verified", 2),
        ("recovery_code_used", 1),
        ("recovery_codes_regenerated", 0),
        ("disabled", 0),
    ):
        assert f'authapp_mfa_events_total{{outcome="{outcome}"}} {float(value)}' in text, outcome


def test_a_failed_enable_and_a_reset_of_an_account_without_mfa_are_counted_as_what_they_are(
    app, client, tokens, frozen
):
    access = tokens["access_token"]
    secret = setup(client, access).get_json()["secret"]
    assert_error(enable_code(client, access, refused_code(secret, frozen.now(), 7)), 400, "VALIDATION_ERROR")
    result = app.test_cli_runner().invoke(args=["users", "reset-mfa", "alice"])
    assert result.exit_code == 0 and "MFA was not on" in result.output, result.output
    text = client.get("/metrics").get_data(as_text=True)
    for outcome, value in (("enable_failed", 1), ("failed", 0), ("disabled", 0)):
        assert f'authapp_mfa_events_total{{outcome="{outcome}"}} {float(value)}' in text, outcome


def test_a_secret_sealed_under_a_previous_jwt_secret_key_still_opens(database_url, frozen):
    old = "an-older-secret-key-that-is-long-enough-0123456789abcdefghijklmn"
    first = create_app(base_settings(DATABASE_URL=database_url, JWT_SECRET_KEY=old))
    client = first.test_client()
    response = client.post(
        "/auth/register", json={"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    )
    enabled = enable_mfa(client, response.get_json(), frozen)
    rotated = create_app(base_settings(DATABASE_URL=database_url, JWT_PREVIOUS_SECRET_KEYS=old))
    client = rotated.test_client()
    assert verify(client, challenge(client), code=code_at(enabled.secret, frozen.now())).status_code == 200
    # Opened with the previous secret, it was sealed again under the current one: the
    # previous secret can go.
    without_old = create_app(base_settings(DATABASE_URL=database_url))
    client = without_old.test_client()
    frozen.move(3 * STEP)
    assert verify(client, challenge(client), code=code_at(enabled.secret, frozen.now())).status_code == 200
    for app in (first, rotated, without_old):
        with app.app_context():
            db.engine.dispose()


def test_flask_keys_reseal_seals_signing_keys_and_totp_secrets_under_the_current_secret(database_url, frozen):
    old = "an-older-secret-key-that-is-long-enough-0123456789abcdefghijklmn"
    stray = "a-secret-nobody-configures-any-more-0123456789abcdefghijklmnopqr"
    made = []

    def make(**settings):
        made.append(create_app(base_settings(DATABASE_URL=database_url, JWT_ALGORITHM="EdDSA", **settings)))
        return made[-1]

    first = make(JWT_SECRET_KEY=old)
    assert first.test_cli_runner().invoke(args=["keys", "generate", "--activate"]).exit_code == 0
    client = first.test_client()
    response = client.post(
        "/auth/register", json={"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    )
    enabled = enable_mfa(client, response.get_json(), frozen)

    rotated = make(JWT_PREVIOUS_SECRET_KEYS=old)
    result = rotated.test_cli_runner().invoke(args=["keys", "reseal"])
    assert result.exit_code == 0, result.output
    assert "signing key(s): 1 re-sealed, 0 already under JWT_SECRET_KEY" in result.output
    assert "TOTP secret(s): 1 re-sealed, 0 already under JWT_SECRET_KEY" in result.output
    again = rotated.test_cli_runner().invoke(args=["keys", "reseal"])
    assert again.exit_code == 0 and "TOTP secret(s): 0 re-sealed, 1 already" in again.output, again.output
    assert enabled.secret not in result.output + again.output

    # The old secret removed: tokens are signed and the second factor is checked.
    without_old = make()
    client = without_old.test_client()
    session = verify(client, challenge(client), code=code_at(enabled.secret, frozen.now()))
    assert session.status_code == 200, session.get_json()
    assert client.get("/auth/me", headers=bearer(session.get_json()["access_token"])).status_code == 200

    # A value no configured secret opens is named (never shown), and the command fails.
    lost = make(JWT_SECRET_KEY=stray)
    failed = lost.test_cli_runner().invoke(args=["keys", "reseal"])
    assert failed.exit_code == 1
    assert "2 value(s) open with no configured secret" in failed.output
    assert "signing key " in failed.output and "TOTP secret of user 1" in failed.output
    for app in made:
        with app.app_context():
            db.engine.dispose()


# -- Races (threads and a real server, PostgreSQL) ------------------------------------------


@pytest.fixture
def pg_app(pg_database_url):
    app = create_app(base_settings(DATABASE_URL=pg_database_url))
    yield app
    with app.app_context():
        db.engine.dispose()


def _at_once(monkeypatch, *functions: tuple[Any, str]) -> Callable[[], None]:
    """Make each of `functions` (module, name), once called, wait until every one of them
    was: the threads calling them then go on together. Returns what undoes it."""
    barrier = threading.Barrier(len(functions), timeout=30)
    originals = []
    for target, name in functions:
        real = getattr(target, name)
        originals.append((target, name, real))

        def wrapper(*args, _real=real, **kwargs):
            result = _real(*args, **kwargs)
            barrier.wait()
            return result

        monkeypatch.setattr(target, name, wrapper)

    def undo() -> None:
        for target, name, real in originals:
            monkeypatch.setattr(target, name, real)

    return undo


def _in_threads(*calls: Callable[[], Any]) -> list[Any]:
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], Any]) -> None:
        try:
            results[index] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def _register_and_enable(base: str, frozen: Clock) -> tuple[str, str, dict[str, Any]]:
    status, first = post_json(
        f"{base}/auth/register", {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    )
    assert status == 201
    access = first["access_token"]
    _, _, body = http("POST", f"{base}/auth/mfa/totp/setup", {"current_password": PASSWORD}, bearer(access))
    secret = body["secret"]
    status, _, _ = http("POST", f"{base}/auth/mfa/totp/enable", {"code": code_at(secret, frozen.now())}, bearer(access))
    assert status == 200
    frozen.move(3 * STEP)
    return secret, access, first


def _challenge(base: str) -> str:
    status, body = post_json(f"{base}/auth/login", {"username": "alice", "password": PASSWORD})
    assert status == 200 and body["mfa_required"], body
    return body["mfa_token"]


@pytest.mark.parametrize("same_challenge", [True, False], ids=["one-challenge", "two-challenges"])
def test_two_verifications_of_one_code_at_once_give_one_session(pg_app, frozen, monkeypatch, same_challenge):
    with live_server(pg_app) as base:
        secret, _, _ = _register_and_enable(base, frozen)
        for trial in range(3):
            frozen.move(3 * STEP)
            code = code_at(secret, frozen.now())
            first = _challenge(base)
            second = first if same_challenge else _challenge(base)
            # Both have checked the code before either writes anything.
            undo = _at_once(monkeypatch, (mfa, "matching_step"), (mfa, "matching_step"))
            results = _in_threads(
                lambda token=first, code=code: post_json(f"{base}/auth/mfa/verify", {"mfa_token": token, "code": code}),
                lambda token=second, code=code: post_json(
                    f"{base}/auth/mfa/verify", {"mfa_token": token, "code": code}
                ),
            )
            undo()
            statuses = sorted(status for status, _ in results)
            assert statuses == [200, 401], (trial, results)
            refused = next(body for status, body in results if status == 401)
            assert refused["error_code"] == ("INVALID_TOKEN" if same_challenge else "INVALID_MFA_CODE")
            with pg_app.app_context():
                live = db.session.scalars(
                    select(AuthSession.id).where(AuthSession.revoked_at.is_(None), AuthSession.aal == "aal2")
                ).all()
                db.session.remove()
            assert len(live) == 2 + trial  # the enabling session, and one per trial


def test_enabling_while_another_session_refreshes_leaves_that_session_revoked(pg_app, frozen, monkeypatch):
    with live_server(pg_app) as base:
        status, first = post_json(
            f"{base}/auth/register", {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
        )
        assert status == 201
        access = first["access_token"]
        for trial in range(3):
            status, other = post_json(f"{base}/auth/login", {"username": "alice", "password": PASSWORD})
            assert status == 200 and "access_token" in other
            _, _, body = http("POST", f"{base}/auth/mfa/totp/setup", {"current_password": PASSWORD}, bearer(access))
            code = code_at(body["secret"], frozen.now())
            undo = _at_once(monkeypatch, (mfa, "matching_step"), (token_service, "decode_refresh_token"))
            enabled, refreshed = _in_threads(
                lambda code=code: http("POST", f"{base}/auth/mfa/totp/enable", {"code": code}, bearer(access)),
                lambda other=other: post_json(f"{base}/auth/refresh", {"refresh_token": other["refresh_token"]}),
            )
            undo()
            assert enabled[0] == 200, enabled
            assert refreshed[0] in (200, 401), refreshed
            dead = [other["access_token"]]
            if refreshed[0] == 200:
                dead.append(refreshed[1]["access_token"])
                status, body = post_json(f"{base}/auth/refresh", {"refresh_token": refreshed[1]["refresh_token"]})
                assert status == 401 and body["error_code"] == "TOKEN_REVOKED", body
            for token in dead:
                status, _, body = http("GET", f"{base}/auth/me", headers=bearer(token))
                assert status == 401 and body["error_code"] == "TOKEN_REVOKED", (trial, body)
            with pg_app.app_context():
                row = db.session.get(AuthSession, sid_of(other))
                assert row.revoked_at is not None and row.revoked_reason == "mfa_enabled"
                db.session.remove()
            # Off again for the next trial (the enabling session is aal2).
            assert http("POST", f"{base}/auth/mfa/disable", {"current_password": PASSWORD}, bearer(access))[0] == 204
            frozen.move(3 * STEP)


def _no_aal1_session_with_mfa_on(app) -> None:
    with app.app_context():
        on = db.session.get(MfaTotp, 1)
        live = db.session.scalars(
            select(AuthSession.aal).where(AuthSession.user_id == 1, AuthSession.revoked_at.is_(None))
        ).all()
        db.session.remove()
    assert on is not None and on.enabled_at is not None
    assert "aal1" not in live, live


def _setup_then_hold(base: str, frozen: Clock, monkeypatch, target: Any, name: str) -> tuple[str, str, Callable]:
    """Register alice, set up TOTP; make the next call of target.name wait 1.5 s once it is
    done (the racing flow's transaction has read what it read), and answer the code and
    an enable call that starts in that pause."""
    status, first = post_json(
        f"{base}/auth/register", {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    )
    assert status == 201
    access = first["access_token"]
    _, _, body = http("POST", f"{base}/auth/mfa/totp/setup", {"current_password": PASSWORD}, bearer(access))
    code = code_at(body["secret"], frozen.now())
    real = getattr(target, name)
    paused = threading.Event()

    def slow(*args, **kwargs):
        result = real(*args, **kwargs)
        if not paused.is_set():
            paused.set()
            time.sleep(1.5)
        return result

    monkeypatch.setattr(target, name, slow)

    def do_enable():
        assert paused.wait(10)
        time.sleep(0.2)
        return http("POST", f"{base}/auth/mfa/totp/enable", {"code": code}, bearer(access))

    return access, code, do_enable


def test_a_login_racing_the_enable_gives_no_aal1_session(pg_app, frozen, monkeypatch):
    # The login has decided (MFA off) when the enable starts: it must wait for the login's
    # session and end it, or the login must see MFA on.
    with live_server(pg_app) as base:
        _, _, do_enable = _setup_then_hold(base, frozen, monkeypatch, mfa, "is_enabled")
        logged, enabled = _in_threads(
            lambda: post_json(f"{base}/auth/login", {"username": "alice", "password": PASSWORD}), do_enable
        )
        assert enabled[0] == 200, enabled
        assert logged[0] == 200, logged
        _no_aal1_session_with_mfa_on(pg_app)
        if "access_token" in logged[1]:
            status, _, body = http("GET", f"{base}/auth/me", headers=bearer(logged[1]["access_token"]))
            assert status == 401 and body["error_code"] == "TOKEN_REVOKED", body


def test_a_password_change_racing_the_enable_gives_no_aal1_session(pg_app, frozen, monkeypatch):
    # The change's new hash is made (bcrypt, the wide window) when the enable commits: the
    # change's session was ended by the enable, so it starts none.
    with live_server(pg_app) as base:
        access, _, do_enable = _setup_then_hold(base, frozen, monkeypatch, passwords, "hash_password")
        status, other = post_json(f"{base}/auth/login", {"username": "alice", "password": PASSWORD})
        assert status == 200
        changed, enabled = _in_threads(
            lambda: http(
                "POST",
                f"{base}/auth/change-password",
                {"current_password": PASSWORD, "new_password": NEW_PASSWORD},
                bearer(other["access_token"]),
            ),
            do_enable,
        )
        assert enabled[0] == 200, enabled
        assert changed[0] == 401 and changed[2]["error_code"] == "TOKEN_REVOKED", changed
        _no_aal1_session_with_mfa_on(pg_app)
        # Nothing of the change was written: the password is the old one, the enabler lives.
        assert http("GET", f"{base}/auth/me", headers=bearer(access))[0] == 200
        status, body = post_json(f"{base}/auth/login", {"username": "alice", "password": PASSWORD})
        assert status == 200 and body["mfa_required"], body


def test_a_password_reset_racing_the_enable_gives_no_aal1_session(pg_app, frozen, monkeypatch):
    with live_server(pg_app) as base:
        _, _, do_enable = _setup_then_hold(base, frozen, monkeypatch, mfa, "is_enabled")
        with pg_app.app_context():
            token = links.issue(
                db.session, links.PASSWORD_RESET, 1, "alice@example.com", clock.now(), timedelta(hours=1)
            )
            db.session.commit()
            db.session.remove()
        reset, enabled = _in_threads(
            lambda: post_json(f"{base}/auth/password-reset", {"token": token, "new_password": NEW_PASSWORD}),
            do_enable,
        )
        # The reset ended the enabling session first (enable: TOKEN_REVOKED), or the
        # enable came first and the reset answers a challenge.
        assert reset[0] == 200, reset
        if enabled[0] == 200:
            assert reset[1]["mfa_required"], reset
            _no_aal1_session_with_mfa_on(pg_app)
        else:
            assert enabled[0] == 401 and enabled[2]["error_code"] == "TOKEN_REVOKED", enabled


def test_deleting_a_user_erases_its_factor_and_recovery_codes(app, client, tokens, frozen):
    enable_mfa(client, tokens, frozen)
    result = app.test_cli_runner().invoke(args=["users", "delete", "alice", "--yes"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalars(select(MfaTotp)).all() == []
        assert db.session.scalars(select(MfaRecoveryCode)).all() == []
    # A new account (SQLite may give it the same id) starts without MFA.
    again = client.post(
        "/auth/register", json={"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    )
    assert again.get_json()["user"]["mfa_enabled"] is False
    assert "access_token" in login(client).get_json()


def test_a_password_change_in_an_aal2_session_starts_an_aal2_session(client, tokens, frozen):
    enabled = enable_mfa(client, tokens, frozen)
    session = verify(client, challenge(client), code=code_at(enabled.secret, frozen.now())).get_json()
    changed = client.post(
        "/auth/change-password",
        headers=bearer(session["access_token"]),
        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
    )
    assert changed.status_code == 200, changed.get_json()
    body = changed.get_json()
    assert body["aal"] == "aal2" and claims(body["access_token"])["amr"] == ["pwd", "otp"]
    assert regenerate(client, body["access_token"], NEW_PASSWORD).status_code == 200
    # And the next login still asks for the second factor.
    assert challenge(client, password=NEW_PASSWORD)


def test_the_migration_keeps_every_session_and_token_both_ways(app, client, tokens, frozen):
    import flask_migrate
    from sqlalchemy import func

    from authapp.models import RefreshToken

    def counts() -> tuple[int, int]:
        with app.app_context():
            connection = db.session.connection()
            result = (
                connection.execute(select(func.count()).select_from(AuthSession.__table__)).scalar_one(),
                connection.execute(select(func.count()).select_from(RefreshToken.__table__)).scalar_one(),
            )
            db.session.commit()
            db.engine.dispose()
            return result

    login(client)
    before = counts()
    assert before == (2, 2)
    with app.app_context():
        flask_migrate.downgrade(revision="0005_email")
        db.engine.dispose()
    assert counts() == before
    with app.app_context():
        flask_migrate.upgrade()
        db.engine.dispose()
    assert counts() == before
    refreshed = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200 and refreshed.get_json()["aal"] == "aal1"
