"""A credential checked before a password change, a reset or a deactivation never yields a
session, nor any other write, after it: the login, change-password, change of address, MFA
setup, MFA disable or new recovery codes whose bcrypt check raced one of them fails.

The interleaving is injected, not left to luck: the password check is wrapped so that,
right after bcrypt said yes and before the request writes anything, another request (in a
thread of its own, with its own database connection) changes the password or deactivates
the account and commits. A real-server run with threads at cost 11 is in the race suite
(`--with race`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pyotp
import pytest
from helpers import PASSWORD, assert_error, bearer
from sqlalchemy import select

from authapp import clock
from authapp.auth import links, passwords
from authapp.database import unit_of_work
from authapp.extensions import db
from authapp.mail import outbox
from authapp.models import AuthSession, MfaRecoveryCode, MfaTotp, OneTimeToken, OutboxMessage, User

NEW_PASSWORD = "granite-meadow-lantern-7"


def login(client, password=PASSWORD):
    return client.post("/auth/login", json={"username": "alice", "password": password})


@pytest.fixture
def between_bcrypt_and_write(monkeypatch) -> Iterator[Callable[[Callable[[], None]], None]]:
    """`between(action)`: the next successful password check runs `action` in another
    thread, and waits for it to finish, before returning to its caller."""
    errors: list[BaseException] = []

    def between(action: Callable[[], None]) -> None:
        real = passwords.verify_password
        armed = [True]

        def run() -> None:
            try:
                action()
            except BaseException as exc:  # reported in the test's own thread
                errors.append(exc)

        def verify(password: str, hashed: str) -> bool:
            ok = real(password, hashed)
            if ok and armed[0]:
                armed[0] = False
                other = threading.Thread(target=run)
                other.start()
                other.join(timeout=60)
                assert not other.is_alive(), "the interleaved request did not finish"
            return ok

        monkeypatch.setattr(passwords, "verify_password", verify)

    yield between
    if errors:
        raise errors[0]


def cli(app, *args: str, input: str | None = None) -> None:
    result = app.test_cli_runner().invoke(args=list(args), input=input)
    assert result.exit_code == 0, result.output


def change_password(client, access, current=PASSWORD, new=NEW_PASSWORD):
    return client.post(
        "/auth/change-password", headers=bearer(access), json={"current_password": current, "new_password": new}
    )


def live_sessions(app) -> int:
    with app.app_context():
        return len(db.session.scalars(select(AuthSession.id).where(AuthSession.revoked_at.is_(None))).all())


def assert_the_change_won(app, client, raced) -> None:
    """The login that raced a change of password lost: 401, only the change's own session
    is live, and only the new password works."""
    assert_error(raced, 401, "INVALID_CREDENTIALS")
    assert live_sessions(app) == 1
    assert_error(login(client), 401, "INVALID_CREDENTIALS")
    assert login(client, NEW_PASSWORD).status_code == 200


def test_login_racing_a_password_change_fails(app, client, tokens, between_bcrypt_and_write):
    changed: list[int] = []
    between_bcrypt_and_write(lambda: changed.append(change_password(client, tokens["access_token"]).status_code))
    raced = login(client)
    assert changed == [200]
    assert_the_change_won(app, client, raced)


@pytest.mark.parametrize("settings", [{"BCRYPT_ROUNDS": "5"}])
def test_a_racing_rehash_never_overwrites_the_new_password(app, client, between_bcrypt_and_write):
    # alice's hash is at cost 4; the app wants 5, so her next login rehashes it
    with app.app_context():
        db.session.add(
            User(email="alice@example.com", username="alice", hashed_password=passwords.hash_password(PASSWORD, 4))
        )
        db.session.commit()
        user_id = db.session.scalar(select(User.id))
    first = login(client).get_json()  # rehashed to cost 5 by this login
    with app.app_context():
        db.session.execute(
            User.__table__.update().values(hashed_password=passwords.hash_password(PASSWORD, 4))
        )  # due for a rehash again
        db.session.commit()
    changed: list[int] = []
    between_bcrypt_and_write(lambda: changed.append(change_password(client, first["access_token"]).status_code))
    assert_error(login(client), 401, "INVALID_CREDENTIALS")
    assert changed == [200]
    with app.app_context():
        stored = db.session.scalar(select(User.hashed_password).where(User.id == user_id))
    assert passwords.verify_password(NEW_PASSWORD, stored)
    assert not passwords.verify_password(PASSWORD, stored)
    assert login(client, NEW_PASSWORD).status_code == 200
    assert_error(login(client), 401, "INVALID_CREDENTIALS")


def test_login_racing_a_deactivation_fails(app, client, tokens, between_bcrypt_and_write):
    between_bcrypt_and_write(lambda: cli(app, "users", "deactivate", "alice"))
    assert_error(login(client), 401, "INVALID_CREDENTIALS")
    assert live_sessions(app) == 0


def test_login_racing_an_operator_password_change_fails(app, client, tokens, between_bcrypt_and_write):
    between_bcrypt_and_write(
        lambda: cli(app, "users", "set-password", "alice", "--password-stdin", input=NEW_PASSWORD + "\n")
    )
    assert_error(login(client), 401, "INVALID_CREDENTIALS")
    assert live_sessions(app) == 0
    assert login(client, NEW_PASSWORD).status_code == 200


def test_of_two_racing_password_changes_only_the_first_wins(app, client, tokens, between_bcrypt_and_write):
    other = login(client).get_json()
    changed: list[int] = []
    between_bcrypt_and_write(
        lambda: changed.append(change_password(client, other["access_token"], new="second-quarry-willow-3").status_code)
    )
    raced = change_password(client, tokens["access_token"])
    assert changed == [200]
    assert_error(raced, 401, "INVALID_CREDENTIALS")
    assert login(client, "second-quarry-willow-3").status_code == 200
    assert_error(login(client, NEW_PASSWORD), 401, "INVALID_CREDENTIALS")


def test_login_racing_a_password_reset_fails(app, client, tokens, between_bcrypt_and_write):
    with app.app_context(), unit_of_work() as session:
        token = links.issue(
            session, links.PASSWORD_RESET, tokens["user"]["id"], "alice@example.com", clock.now(), timedelta(hours=1)
        )
    reset: list[int] = []
    between_bcrypt_and_write(
        lambda: reset.append(
            client.post("/auth/password-reset", json={"token": token, "new_password": NEW_PASSWORD}).status_code
        )
    )
    raced = login(client)
    assert reset == [200]
    assert_the_change_won(app, client, raced)


# -- Writes other than a session: each checks the current password, then writes ----------


def test_a_change_of_address_racing_a_password_change_fails(app, client, tokens, between_bcrypt_and_write):
    # Someone holds a session and the old password; the account holder changes it.
    other = login(client).get_json()
    changed: list[int] = []
    between_bcrypt_and_write(lambda: changed.append(change_password(client, tokens["access_token"]).status_code))
    raced = client.post(
        "/auth/change-email",
        headers=bearer(other["access_token"]),
        json={"new_email": "attacker@example.com", "current_password": PASSWORD},
    )
    assert changed == [200]
    assert_error(raced, 401, "INVALID_CREDENTIALS")
    # no link to the other address was queued, and none waits to be used
    with app.app_context():
        assert db.session.scalars(select(OneTimeToken.id).where(OneTimeToken.kind == links.CHANGE_EMAIL)).all() == []
        to_attacker = OutboxMessage.recipient_key == outbox.recipient_key("attacker@example.com")
        assert db.session.scalars(select(OutboxMessage.id).where(to_attacker)).all() == []


def turn_mfa_on(client, access: str) -> list[str]:
    """MFA on for alice, from the session of `access`; returns the recovery codes."""
    setup = client.post("/auth/mfa/totp/setup", headers=bearer(access), json={"current_password": PASSWORD})
    assert setup.status_code == 200, setup.get_json()
    code = pyotp.TOTP(setup.get_json()["secret"]).now()
    enabled = client.post("/auth/mfa/totp/enable", headers=bearer(access), json={"code": code})
    assert enabled.status_code == 200, enabled.get_json()
    return enabled.get_json()["recovery_codes"]


def second_session(client, recovery_code: str) -> str:
    """The access token of another aal2 session of alice (old password, a recovery code)."""
    challenge = login(client).get_json()["mfa_token"]
    verified = client.post("/auth/mfa/verify", json={"mfa_token": challenge, "recovery_code": recovery_code})
    assert verified.status_code == 200, verified.get_json()
    return verified.get_json()["access_token"]


def recovery_code_hashes(app) -> set[str]:
    with app.app_context():
        return set(db.session.scalars(select(MfaRecoveryCode.code_hash)).all())


def test_mfa_disable_racing_a_password_change_fails(app, client, tokens, between_bcrypt_and_write):
    codes = turn_mfa_on(client, tokens["access_token"])
    other = second_session(client, codes[0])
    changed: list[dict] = []
    between_bcrypt_and_write(lambda: changed.append(change_password(client, tokens["access_token"]).get_json()))
    raced = client.post("/auth/mfa/disable", headers=bearer(other), json={"current_password": PASSWORD})
    assert len(changed) == 1 and "access_token" in changed[0], changed
    assert raced.status_code == 401, raced.status_code  # a 204 has no body to show
    assert_error(raced, 401, "INVALID_CREDENTIALS")
    # MFA is still on, and the change's own session (aal2) was not ended
    me = client.get("/auth/me", headers=bearer(changed[0]["access_token"]))
    assert me.status_code == 200 and me.get_json()["mfa_enabled"] is True
    assert live_sessions(app) == 1


def test_new_recovery_codes_racing_a_password_change_fail(app, client, tokens, between_bcrypt_and_write):
    codes = turn_mfa_on(client, tokens["access_token"])
    other = second_session(client, codes[0])
    before = recovery_code_hashes(app)
    changed: list[int] = []
    between_bcrypt_and_write(lambda: changed.append(change_password(client, tokens["access_token"]).status_code))
    raced = client.post("/auth/mfa/recovery-codes", headers=bearer(other), json={"current_password": PASSWORD})
    assert changed == [200]
    assert_error(raced, 401, "INVALID_CREDENTIALS")
    assert recovery_code_hashes(app) == before  # the account holder's codes, not a new set


def test_mfa_setup_racing_a_password_change_fails(app, client, tokens, between_bcrypt_and_write):
    other = login(client).get_json()
    changed: list[int] = []
    between_bcrypt_and_write(lambda: changed.append(change_password(client, tokens["access_token"]).status_code))
    raced = client.post(
        "/auth/mfa/totp/setup", headers=bearer(other["access_token"]), json={"current_password": PASSWORD}
    )
    assert changed == [200]
    assert_error(raced, 401, "INVALID_CREDENTIALS")
    with app.app_context():
        assert db.session.scalars(select(MfaTotp.user_id)).all() == []  # no pending secret stored


def test_a_change_of_address_racing_a_deactivation_fails(app, client, tokens, between_bcrypt_and_write):
    between_bcrypt_and_write(lambda: cli(app, "users", "deactivate", "alice"))
    raced = client.post(
        "/auth/change-email",
        headers=bearer(tokens["access_token"]),
        json={"new_email": "new@example.com", "current_password": PASSWORD},
    )
    assert_error(raced, 401, "INVALID_CREDENTIALS")
    with app.app_context():
        assert db.session.scalars(select(OneTimeToken.id).where(OneTimeToken.kind == links.CHANGE_EMAIL)).all() == []


# -- The race suite: a real server, real threads, the production-like bcrypt cost ---------


def _race_once(base: str, name: str) -> None:
    from helpers import http, post_json

    status, first = post_json(
        f"{base}/auth/register", {"email": f"{name}@example.com", "username": name, "password": PASSWORD}
    )
    assert status == 201, first
    stop = threading.Event()
    sessions: list[str] = []
    attempts = [0]

    def keep_logging_in() -> None:
        while not stop.is_set():
            attempts[0] += 1
            status, body = post_json(f"{base}/auth/login", {"username": name, "password": PASSWORD})
            if status == 200:
                sessions.append(body["access_token"])
            else:
                assert status == 401, (status, body)

    threads = [threading.Thread(target=keep_logging_in) for _ in range(2)]
    for thread in threads:
        thread.start()
    while attempts[0] < 3:  # both threads are in their bcrypt loop
        stop.wait(0.02)
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    status, _, _ = http("POST", f"{base}/auth/change-password", body, headers=bearer(first["access_token"]))
    assert status == 200
    stop.wait(0.3)  # logins that began before the change end after it
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert sessions, "no old-password login succeeded before the change: the trial proved nothing"
    live = [t for t in sessions if http("GET", f"{base}/auth/me", headers=bearer(t))[0] == 200]
    assert live == [], f"{name}: {len(live)} of {len(sessions)} old-password sessions survived"
    assert post_json(f"{base}/auth/login", {"username": name, "password": NEW_PASSWORD})[0] == 200
    assert post_json(f"{base}/auth/login", {"username": name, "password": PASSWORD})[0] == 401


@pytest.mark.race
@pytest.mark.parametrize("settings", [{"BCRYPT_ROUNDS": "11"}])
def test_logins_racing_a_password_change_on_a_real_server(app):
    """Two threads keep logging in with the old password while the owner changes it, three
    times over: afterwards no session that an old-password login got is live, and only the
    new password works (before the fix: old-password sessions survived in every trial)."""
    from helpers import live_server

    with live_server(app) as base:
        for trial in range(3):
            _race_once(base, f"racer{trial}")
