"""Register, login, refresh and /auth/me as the contract describes them."""

from __future__ import annotations

from datetime import UTC, datetime

import jwt
from helpers import PASSWORD, SECRET, TIMESTAMP_RE, assert_error, bearer

USER_KEYS = {"id", "email", "username", "is_active", "created_at", "last_login", "email_verified", "mfa_enabled"}


def claims(token: str) -> dict:
    return jwt.decode(token, SECRET, algorithms=["HS256"], audience="authapp", issuer="authapp")


def test_register_returns_token_response(client):
    response = client.post(
        "/auth/register",
        json={"email": "  New.User@Example.COM ", "username": "NewUser", "password": PASSWORD},
    )
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in", "aal", "user"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 1800
    user = body["user"]
    assert set(user) == USER_KEYS
    assert user["email"] == "new.user@example.com"
    assert user["username"] == "NewUser"
    assert user["is_active"] is True
    assert user["last_login"] is None
    assert TIMESTAMP_RE.match(user["created_at"])
    assert "hashed_password" not in response.get_data(as_text=True)


def test_token_claims(tokens):
    access, refresh = claims(tokens["access_token"]), claims(tokens["refresh_token"])
    for c, kind in ((access, "access"), (refresh, "refresh")):
        assert c["type"] == kind
        assert c["sub"] == str(tokens["user"]["id"])
        assert c["iss"] == "authapp" and c["aud"] == "authapp"
        assert c["jti"] and c["nbf"] <= c["iat"] + 1
    assert access["exp"] - access["iat"] == 30 * 60
    assert refresh["exp"] - refresh["iat"] == 7 * 24 * 3600
    assert access["jti"] != refresh["jti"]


def test_login_by_email_and_by_username_any_case(client, tokens):
    for body in (
        {"email": "ALICE@example.com", "password": PASSWORD},
        {"username": "ALICE", "password": PASSWORD},
        {"username": "alice", "password": PASSWORD},
    ):
        response = client.post("/auth/login", json=body)
        assert response.status_code == 200, response.get_json()
        user = response.get_json()["user"]
        assert user["id"] == tokens["user"]["id"]
        last_login = datetime.fromisoformat(user["last_login"].replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - last_login).total_seconds()) < 5


def test_login_failures_look_the_same(client, tokens, app):
    wrong = client.post("/auth/login", json={"username": "alice", "password": "not-the-password-1"})
    unknown = client.post("/auth/login", json={"username": "nobody", "password": PASSWORD})
    with app.app_context():
        from authapp.extensions import db
        from authapp.models import User

        db.session.get(User, tokens["user"]["id"]).is_active = False
        db.session.commit()
    inactive = client.post("/auth/login", json={"username": "alice", "password": PASSWORD})
    details = {assert_error(r, 401, "INVALID_CREDENTIALS")["detail"] for r in (wrong, unknown, inactive)}
    assert details == {"Invalid credentials"}


def test_login_needs_exactly_one_identifier(client, tokens):
    both = client.post("/auth/login", json={"email": "alice@example.com", "username": "alice", "password": PASSWORD})
    neither = client.post("/auth/login", json={"password": PASSWORD})
    for response in (both, neither):
        assert "_body" in assert_error(response, 400, "VALIDATION_ERROR")["errors"]


def test_refresh_returns_a_new_pair(client, tokens):
    response = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 200
    body = response.get_json()
    assert body["access_token"] != tokens["access_token"]
    assert body["refresh_token"] != tokens["refresh_token"]
    assert body["user"]["id"] == tokens["user"]["id"]
    assert client.get("/auth/me", headers=bearer(body["access_token"])).status_code == 200


def test_me_returns_the_user(client, tokens):
    response = client.get("/auth/me", headers=bearer(tokens["access_token"]))
    assert response.status_code == 200
    assert response.get_json() == tokens["user"]


def test_register_conflicts_ignore_case(client, tokens):
    same_email = client.post(
        "/auth/register", json={"email": "ALICE@EXAMPLE.COM", "username": "other1", "password": PASSWORD}
    )
    same_username = client.post(
        "/auth/register", json={"email": "other@example.com", "username": "Alice", "password": PASSWORD}
    )
    assert_error(same_email, 409, "USER_ALREADY_EXISTS")
    assert_error(same_username, 409, "USER_ALREADY_EXISTS")


def test_stored_hash_is_standard_bcrypt_at_configured_cost(app, tokens):
    from authapp.extensions import db
    from authapp.models import User

    with app.app_context():
        hashed = db.session.get(User, tokens["user"]["id"]).hashed_password
    assert hashed.startswith("$2b$04$") and len(hashed) == 60


def test_login_rehashes_a_hash_of_another_cost(app, client, tokens):
    from authapp.auth import passwords
    from authapp.extensions import db
    from authapp.models import User

    with app.app_context():
        user = db.session.get(User, tokens["user"]["id"])
        user.hashed_password = passwords.hash_password(PASSWORD, 5)
        db.session.commit()
    assert client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 200
    with app.app_context():
        assert db.session.get(User, tokens["user"]["id"]).hashed_password.startswith("$2b$04$")
