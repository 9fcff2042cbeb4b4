"""Server-side sessions: rotation, replay and theft, logout, revocation, lifetime."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from helpers import PASSWORD, SECRET, assert_error, bearer, live_server, post_json, statements_sent
from sqlalchemy import func, select, update

from authapp.extensions import db
from authapp.models import AuthSession, RefreshToken, User


def claims(token: str) -> dict:
    return jwt.decode(token, SECRET, algorithms=["HS256"], audience="authapp")


def do_refresh(client, token):
    return client.post("/auth/refresh", json={"refresh_token": token})


def me(client, access):
    return client.get("/auth/me", headers=bearer(access))


def login(client, username="alice", password=PASSWORD):
    response = client.post("/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_tokens_carry_the_session_id(tokens):
    access, refresh = claims(tokens["access_token"]), claims(tokens["refresh_token"])
    assert access["sid"] == refresh["sid"]
    assert len(access["sid"]) == 36


def test_rotation_returns_a_new_pair_in_the_same_session(client, tokens):
    rotated = do_refresh(client, tokens["refresh_token"]).get_json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert rotated["access_token"] != tokens["access_token"]
    assert claims(rotated["refresh_token"])["sid"] == claims(tokens["refresh_token"])["sid"]
    again = do_refresh(client, rotated["refresh_token"])
    assert again.status_code == 200


def test_refresh_tokens_are_not_stored_in_clear(app, tokens):
    jti = claims(tokens["refresh_token"])["jti"]
    with app.app_context():
        stored = db.session.scalars(select(RefreshToken.jti_hash)).all()
    assert stored and jti not in stored
    assert all(tokens["refresh_token"] not in value for value in stored)


def test_replay_inside_the_interval_returns_the_current_pair(client, tokens):
    first = do_refresh(client, tokens["refresh_token"]).get_json()
    replay = do_refresh(client, tokens["refresh_token"])
    assert replay.status_code == 200
    body = replay.get_json()
    assert body["refresh_token"] == first["refresh_token"]
    assert body["access_token"] == first["access_token"]
    # nothing was revoked: every token of the session still works
    assert me(client, tokens["access_token"]).status_code == 200
    assert me(client, first["access_token"]).status_code == 200
    assert do_refresh(client, first["refresh_token"]).status_code == 200


def test_replay_of_an_older_token_follows_the_chain(client, tokens):
    first = do_refresh(client, tokens["refresh_token"]).get_json()
    second = do_refresh(client, first["refresh_token"]).get_json()
    replay = do_refresh(client, tokens["refresh_token"]).get_json()
    assert replay["refresh_token"] == second["refresh_token"]


def test_replay_after_the_interval_revokes_the_session(client, tokens, later):
    other = login(client)
    first = do_refresh(client, tokens["refresh_token"]).get_json()
    later(11)
    assert_error(do_refresh(client, tokens["refresh_token"]), 401, "TOKEN_REVOKED")
    # the thief's and the victim's newest tokens both stop working
    assert_error(do_refresh(client, first["refresh_token"]), 401, "TOKEN_REVOKED")
    assert_error(me(client, first["access_token"]), 401, "TOKEN_REVOKED")
    assert_error(me(client, tokens["access_token"]), 401, "TOKEN_REVOKED")
    # another session of the same user is untouched
    assert me(client, other["access_token"]).status_code == 200


@pytest.mark.parametrize("settings", [{"REFRESH_TOKEN_REUSE_INTERVAL": "0"}])
def test_interval_zero_treats_any_later_replay_as_theft(client, tokens, later):
    do_refresh(client, tokens["refresh_token"])
    later(1)
    assert_error(do_refresh(client, tokens["refresh_token"]), 401, "TOKEN_REVOKED")


def test_parallel_refreshes_never_branch(app, backend, tokens):
    if backend != "postgresql":
        pytest.skip("parallel refreshes are shown against PostgreSQL")
    with live_server(app) as base:
        token = tokens["refresh_token"]
        for _round in range(8):
            results: list[tuple[int, dict]] = []
            barrier = threading.Barrier(4)

            def worker(token=token, results=results, barrier=barrier) -> None:
                barrier.wait()
                results.append(post_json(f"{base}/auth/refresh", {"refresh_token": token}))

            threads = [threading.Thread(target=worker) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert [status for status, _ in results] == [200] * 4
            assert len({body["refresh_token"] for _, body in results}) == 1, "two live branches"
            token = results[0][1]["refresh_token"]
    with app.app_context():
        unused = db.session.scalar(select(func.count()).select_from(RefreshToken).where(RefreshToken.used_at.is_(None)))
        total = db.session.scalar(select(func.count()).select_from(RefreshToken))
    assert unused == 1 and total == 9


def test_logout_ends_this_session_only(client, tokens):
    other = login(client)
    response = client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    assert response.status_code == 204 and response.data == b""
    assert_error(me(client, tokens["access_token"]), 401, "TOKEN_REVOKED")
    assert_error(do_refresh(client, tokens["refresh_token"]), 401, "TOKEN_REVOKED")
    assert me(client, other["access_token"]).status_code == 200
    assert do_refresh(client, other["refresh_token"]).status_code == 200


def test_logout_with_a_refresh_token_ends_its_session_too(client, tokens):
    other = login(client)
    response = client.post(
        "/auth/logout", headers=bearer(tokens["access_token"]), json={"refresh_token": other["refresh_token"]}
    )
    assert response.status_code == 204
    assert_error(me(client, other["access_token"]), 401, "TOKEN_REVOKED")


def test_logout_ignores_a_refresh_token_that_is_not_the_users(client, tokens, register):
    bob = register(username="bob")
    for foreign in (bob["refresh_token"], "garbage", tokens["access_token"]):
        mine = login(client)
        response = client.post("/auth/logout", headers=bearer(mine["access_token"]), json={"refresh_token": foreign})
        assert response.status_code == 204
        # the caller is logged out all the same; bob's session is untouched
        assert_error(me(client, mine["access_token"]), 401, "TOKEN_REVOKED")
    assert me(client, bob["access_token"]).status_code == 200
    assert me(client, tokens["access_token"]).status_code == 200


def test_logout_all_ends_every_session(client, tokens):
    sessions = [tokens, login(client), login(client)]
    assert client.post("/auth/logout-all", headers=bearer(tokens["access_token"])).status_code == 204
    for s in sessions:
        assert_error(me(client, s["access_token"]), 401, "TOKEN_REVOKED")
        assert_error(do_refresh(client, s["refresh_token"]), 401, "TOKEN_REVOKED")


def test_change_password_ends_every_other_session(client, tokens):
    other = login(client)
    new_password = "granite-meadow-lantern-7"
    response = client.post(
        "/auth/change-password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": PASSWORD, "new_password": new_password},
    )
    assert response.status_code == 200
    fresh = response.get_json()
    assert claims(fresh["access_token"])["sid"] != claims(tokens["access_token"])["sid"]
    assert me(client, fresh["access_token"]).status_code == 200
    for old in (tokens, other):
        assert_error(me(client, old["access_token"]), 401, "TOKEN_REVOKED")
        assert_error(do_refresh(client, old["refresh_token"]), 401, "TOKEN_REVOKED")
    assert_error(
        client.post("/auth/login", json={"username": "alice", "password": PASSWORD}), 401, "INVALID_CREDENTIALS"
    )
    assert login(client, password=new_password)["user"]["username"] == "alice"


def test_change_password_normalises_both_passwords(client, tokens):
    fullwidth_current = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in PASSWORD)
    response = client.post(
        "/auth/change-password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": fullwidth_current, "new_password": "ｇｒａｎｉｔｅ－ｍｅａｄｏｗ－７７"},
    )
    assert response.status_code == 200, response.get_json()
    assert login(client, password="granite-meadow-77")["user"]["username"] == "alice"


def test_change_password_needs_the_current_one(client, tokens):
    response = client.post(
        "/auth/change-password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": "not-it-at-all-9", "new_password": "granite-meadow-lantern-7"},
    )
    assert_error(response, 401, "INVALID_CREDENTIALS")
    assert me(client, tokens["access_token"]).status_code == 200


@pytest.mark.parametrize(
    "new_password,message",
    [("password1", "too common"), ("alice-is-great-9", "username"), ("short", "at least 8"), (PASSWORD, "differ")],
)
def test_change_password_applies_the_policy(client, tokens, new_password, message):
    response = client.post(
        "/auth/change-password",
        headers=bearer(tokens["access_token"]),
        json={"current_password": PASSWORD, "new_password": new_password},
    )
    errors = assert_error(response, 400, "VALIDATION_ERROR")["errors"]["new_password"]
    assert any(message in m for m in errors), errors


def test_list_sessions(client, tokens):
    other = client.post(
        "/auth/login", json={"username": "alice", "password": PASSWORD}, headers={"User-Agent": "TestBrowser/1.0"}
    ).get_json()
    listed = client.get("/auth/sessions", headers=bearer(other["access_token"])).get_json()["sessions"]
    assert len(listed) == 2
    by_id = {s["id"]: s for s in listed}
    current = by_id[claims(other["access_token"])["sid"]]
    assert current["current"] is True and current["user_agent"] == "TestBrowser/1.0" and current["ip"] == "127.0.0.1"
    assert by_id[claims(tokens["access_token"])["sid"]]["current"] is False
    assert set(current) == {"id", "created_at", "last_used_at", "expires_at", "ip", "user_agent", "current"} | {
        "aal",
        "amr",
    }
    assert (current["aal"], current["amr"]) == ("aal1", ["pwd"])
    client.post("/auth/logout", headers=bearer(tokens["access_token"]))
    listed = client.get("/auth/sessions", headers=bearer(other["access_token"])).get_json()["sessions"]
    assert [s["id"] for s in listed] == [current["id"]]


def test_delete_session(client, tokens, register):
    other = login(client)
    sid = claims(other["access_token"])["sid"]
    bob = register(username="bob")
    assert_error(client.delete(f"/auth/sessions/{sid}", headers=bearer(bob["access_token"])), 404, "NOT_FOUND")
    assert_error(client.delete("/auth/sessions/no-such-id", headers=bearer(tokens["access_token"])), 404, "NOT_FOUND")
    assert me(client, other["access_token"]).status_code == 200
    assert client.delete(f"/auth/sessions/{sid}", headers=bearer(tokens["access_token"])).status_code == 204
    assert_error(me(client, other["access_token"]), 401, "TOKEN_REVOKED")
    assert_error(do_refresh(client, other["refresh_token"]), 401, "TOKEN_REVOKED")
    assert me(client, tokens["access_token"]).status_code == 200


def test_session_lifetime_holds_however_often_refreshed(app, client, tokens):
    sid = claims(tokens["access_token"])["sid"]
    with app.app_context():
        started = db.session.get(AuthSession, sid).created_at
    current = tokens
    for _ in range(5):
        current = do_refresh(client, current["refresh_token"]).get_json()
    with app.app_context():
        expires_at = db.session.get(AuthSession, sid).expires_at
    assert expires_at == started + timedelta(days=30)

    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=120)
    with app.app_context():
        db.session.execute(update(AuthSession).where(AuthSession.id == sid).values(expires_at=soon))
        db.session.commit()
    capped = do_refresh(client, current["refresh_token"]).get_json()
    assert claims(capped["refresh_token"])["exp"] == int(soon.timestamp())
    assert claims(capped["access_token"])["exp"] <= int(soon.timestamp())

    with app.app_context():
        db.session.execute(
            update(AuthSession).where(AuthSession.id == sid).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        db.session.commit()
    assert_error(do_refresh(client, capped["refresh_token"]), 401, "TOKEN_EXPIRED")
    assert_error(me(client, capped["access_token"]), 401, "TOKEN_EXPIRED")


def test_deactivated_user_tokens_and_login(app, client, tokens):
    with app.app_context():
        db.session.execute(update(User).values(is_active=False))
        db.session.commit()
    assert_error(me(client, tokens["access_token"]), 401, "USER_INACTIVE")
    assert_error(do_refresh(client, tokens["refresh_token"]), 401, "USER_INACTIVE")
    response = client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    assert_error(response, 401, "INVALID_CREDENTIALS")


def test_me_costs_one_statement(app, client, tokens):
    with app.app_context():
        engine = db.engine
    with statements_sent(engine) as statements:
        assert me(client, tokens["access_token"]).status_code == 200
    assert len(statements) == 1, statements


@pytest.mark.parametrize("settings", [{"SESSION_MAX_PER_USER": "2"}])
def test_a_login_at_the_session_cap_costs_eleven_statements_in_two_transactions(app, client, tokens):
    login(client)  # the second live session: the cap is reached
    sent, commits = statements_and_commits(app, lambda: login(client))
    # the user read and the attempt counted (its guard row locked, the recent ones read);
    # then the hash still the one checked, MFA off, last login, the session beyond the cap
    # ended, the new session and its refresh token, the counted attempts cleared
    assert sent == ["SELECT", "INSERT", "SELECT", "INSERT"] + ["UPDATE", "SELECT", "UPDATE", "UPDATE"] + [
        "INSERT",
        "INSERT",
        "DELETE",
    ], sent
    assert commits == 2
    with app.app_context():
        live = db.session.scalar(select(func.count()).select_from(AuthSession).where(AuthSession.revoked_at.is_(None)))
    assert live == 2


def statements_and_commits(app, action) -> tuple[list[str], int]:
    """The kind of each statement `action` sends (BEGIN and COMMIT left out), and how many
    transactions it commits."""
    from sqlalchemy import event

    with app.app_context():
        engine = db.engine
    commits: list[object] = []
    committed = commits.append  # one bound method, to remove what was listened to
    event.listen(engine, "commit", committed)
    try:
        with statements_sent(engine) as statements:
            action()
    finally:
        event.remove(engine, "commit", committed)
    # (PostgreSQL's statement timeout rides on the first statement of each transaction)
    kinds = [re.sub(r"^SET LOCAL statement_timeout = \d+; ", "", s).split()[0].upper() for s in statements]
    return [kind for kind in kinds if kind not in ("BEGIN", "COMMIT")], len(commits)


def test_a_registration_costs_one_read_and_one_transaction(app, client, backend):
    def register():
        body = {"email": "carol@example.com", "username": "carol", "password": PASSWORD}
        assert client.post("/auth/register", json=body).status_code == 201

    sent, commits = statements_and_commits(app, register)
    # the name and address free (outside any transaction); then the user, its session and
    # refresh token, the verification link, the mail's per-address limit (on PostgreSQL
    # under an advisory lock) and the mail, the user's older links voided
    lock = ["SELECT"] if backend == "postgresql" else []
    assert sent == ["SELECT", "INSERT", "INSERT", "INSERT", "INSERT", *lock, "SELECT", "INSERT", "DELETE"], sent
    assert commits == 1


def test_a_refresh_that_fails_after_its_rotation_retires_nothing(app, client, tokens, monkeypatch):
    """The token's read and the rotation's statements are one transaction, rolled back
    when the refresh fails after them: the token is still unused and rotates."""
    from authapp.auth import refresh

    def stored():
        with app.app_context():
            rows = db.session.execute(select(RefreshToken.used_at)).all()
            return rows, db.session.scalar(select(AuthSession.last_used_at))

    before = stored()
    assert before[0] == [(None,)]

    def failing(*args):
        raise RuntimeError("after the rotation's statement")

    with monkeypatch.context() as patch:
        patch.setattr(refresh, "_Child", failing)
        app.config["PROPAGATE_EXCEPTIONS"] = False
        assert_error(do_refresh(client, tokens["refresh_token"]), 500, "INTERNAL_ERROR")
    assert stored() == before
    rotated = do_refresh(client, tokens["refresh_token"])
    assert rotated.status_code == 200
    assert stored()[0] != before[0]


def test_protected_routes_need_a_token(client):
    for method, path in [
        ("post", "/auth/logout"),
        ("post", "/auth/logout-all"),
        ("post", "/auth/change-password"),
        ("get", "/auth/sessions"),
        ("delete", "/auth/sessions/3fa85f64-5717-4562-b3fc-2c963f66afa6"),
    ]:
        assert_error(getattr(client, method)(path), 401, "MISSING_TOKEN")


# -- Bounded sessions and refresh-token rows ----------------------------------------------


@pytest.fixture
def audit_events():
    import logging

    events: list[dict] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            events.append({"event": record.msg, "sid": getattr(record, "sid", None)})

    handler = Recorder()
    logging.getLogger("authapp.audit").addHandler(handler)
    yield events
    logging.getLogger("authapp.audit").removeHandler(handler)


@pytest.mark.parametrize("settings", [{"SESSION_MAX_PER_USER": "3"}])
def test_a_new_session_past_the_cap_ends_the_oldest(app, client, tokens, audit_events):
    started = []
    for _ in range(3):
        time.sleep(0.005)  # sessions are ordered by their start, to the millisecond
        started.append(login(client))
    second, third, fourth = started  # the fourth live session: the first one ends
    assert_error(me(client, tokens["access_token"]), 401, "TOKEN_REVOKED")
    assert_error(do_refresh(client, tokens["refresh_token"]), 401, "TOKEN_REVOKED")
    for body in (second, third, fourth):
        assert me(client, body["access_token"]).status_code == 200
    with app.app_context():
        reasons = dict(db.session.execute(select(AuthSession.id, AuthSession.revoked_reason)).all())
    first_sid = claims(tokens["access_token"])["sid"]
    assert reasons.pop(first_sid) == "session_limit"
    assert set(reasons.values()) == {None}
    assert {"event": "session_ended_by_limit", "sid": first_sid} in audit_events
    listed = client.get("/auth/sessions", headers=bearer(fourth["access_token"])).get_json()["sessions"]
    assert len(listed) == 3


def test_the_sessions_list_is_bounded(app, client, tokens, database_url):
    """Sessions from before a lower cap still end up in a list of at most the cap."""
    from helpers import base_settings

    from authapp import create_app

    for _ in range(4):
        login(client)
    capped = create_app(base_settings(DATABASE_URL=database_url, SESSION_MAX_PER_USER="2")).test_client()
    listed = capped.get("/auth/sessions", headers=bearer(tokens["access_token"])).get_json()["sessions"]
    assert len(listed) == 2
    assert listed[0]["created_at"] >= listed[1]["created_at"]


def refresh_rows(app, sid):
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(RefreshToken).where(RefreshToken.session_id == sid))


def test_prune_keeps_only_what_reuse_detection_needs(app, client, tokens, later):
    sid = claims(tokens["refresh_token"])["sid"]
    chain = [tokens]
    for _ in range(3):
        chain.append(do_refresh(client, chain[-1]["refresh_token"]).get_json())
    assert refresh_rows(app, sid) == 4
    # within the interval every retired token is kept: a replay still gets the current pair
    assert app.test_cli_runner().invoke(args=["sessions", "prune"]).exit_code == 0
    assert refresh_rows(app, sid) == 4
    later(11)  # past REFRESH_TOKEN_REUSE_INTERVAL (10 s)
    result = app.test_cli_runner().invoke(args=["sessions", "prune"])
    assert "3 refresh token(s)" in result.output, result.output
    assert refresh_rows(app, sid) == 1  # the session's current token only
    # an old stolen token, its row pruned, is still recognised: the session is revoked
    assert_error(do_refresh(client, chain[1]["refresh_token"]), 401, "TOKEN_REVOKED")
    assert_error(do_refresh(client, chain[-1]["refresh_token"]), 401, "TOKEN_REVOKED")
    assert_error(me(client, chain[-1]["access_token"]), 401, "TOKEN_REVOKED")
    with app.app_context():
        assert db.session.get(AuthSession, sid).revoked_reason == "refresh_token_reuse"


def test_after_prune_the_current_token_still_rotates(app, client, tokens, later):
    rotated = do_refresh(client, tokens["refresh_token"]).get_json()
    later(11)
    assert app.test_cli_runner().invoke(args=["sessions", "prune"]).exit_code == 0
    again = do_refresh(client, rotated["refresh_token"])
    assert again.status_code == 200, again.get_json()


def test_times_are_stored_with_real_milliseconds(app, client, monkeypatch):
    """Every time the API returns keeps its milliseconds through the database."""
    from authapp import clock

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz).replace(microsecond=123456)

    monkeypatch.setattr(clock, "datetime", Clock)
    body = {"email": "ms@example.com", "username": "millis", "password": PASSWORD}
    registered = client.post("/auth/register", json=body).get_json()
    logged_in = login(client, "millis")
    assert registered["user"]["created_at"].endswith(".123Z")
    assert logged_in["user"]["last_login"].endswith(".123Z")
    stored = me(client, logged_in["access_token"]).get_json()  # read back from the database
    assert stored["created_at"].endswith(".123Z") and stored["last_login"].endswith(".123Z")
    listed = client.get("/auth/sessions", headers=bearer(logged_in["access_token"])).get_json()["sessions"]
    for session in listed:
        for name in ("created_at", "last_used_at", "expires_at"):
            assert session[name].endswith(".123Z"), session
    with app.app_context():
        raw = db.session.scalar(select(User.created_at).where(User.username == "millis"))
    assert raw.microsecond == 123000
    # JWT times stay whole seconds, and a replay inside the interval re-mints the same pair
    rotated = do_refresh(client, logged_in["refresh_token"]).get_json()
    assert do_refresh(client, logged_in["refresh_token"]).get_json() == rotated
    assert isinstance(claims(rotated["access_token"])["iat"], int)
