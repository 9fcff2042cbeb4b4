"""Bad input: every field rule and malformed body gets a 400/413/415 envelope, never a 500."""

from __future__ import annotations

import pytest
from helpers import PASSWORD, assert_error


def register_body(**changes):
    body = {"email": "bob@example.com", "username": "bob_the.builder-1", "password": PASSWORD}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def field_errors(response, status=400, code="VALIDATION_ERROR"):
    return assert_error(response, status, code)["errors"]


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b"null", b'"x"', b"", b"\xff\xfe{}", b"123", b'{"email": "a@b.co",}', b"\x00"],
    ids=["open-brace", "array", "null", "string", "empty", "invalid-utf8", "number", "trailing-comma", "nul"],
)
@pytest.mark.parametrize("path", ["/auth/register", "/auth/login", "/auth/refresh"])
def test_malformed_bodies(client, path, body):
    response = client.post(path, data=body, content_type="application/json")
    assert list(field_errors(response)) == ["_body"]


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login", "/auth/refresh"])
def test_wrong_content_type(client, path):
    response = client.post(path, data="email=a@b.co", content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_error(client.post(path), 415, "UNSUPPORTED_MEDIA_TYPE")


def test_body_over_64_kib(client):
    body = b'{"email": "' + b"a" * (64 * 1024 - 10) + b'"}'
    assert len(body) > 64 * 1024
    assert_error(client.post("/auth/register", data=body, content_type="application/json"), 413, "PAYLOAD_TOO_LARGE")


def test_body_of_exactly_64_kib_is_read(client):
    prefix, suffix = b'{"email": "', b'"}'
    body = prefix + b"a" * (64 * 1024 - len(prefix) - len(suffix)) + suffix
    assert len(body) == 64 * 1024
    errors = field_errors(client.post("/auth/register", data=body, content_type="application/json"))
    assert "email" in errors


def test_unknown_and_missing_fields(client):
    errors = field_errors(client.post("/auth/register", json={"email": "bob@example.com", "is_admin": True}))
    assert errors["is_admin"] == ["Unknown field."]
    assert set(errors) == {"is_admin", "username", "password"}


@pytest.mark.parametrize(
    "field,value",
    [("email", 5), ("email", None), ("username", ["bob"]), ("password", 12345678), ("password", {"a": 1})],
)
def test_wrong_types(client, field, value):
    assert field in field_errors(client.post("/auth/register", json=register_body(**{field: value})))


@pytest.mark.parametrize(
    "email",
    ["not-an-email", "a@b", "@example.com", "a b@example.com", "x" * 95 + "@example.com", ""],
    ids=["no-at", "no-tld", "no-local", "space", "too-long", "empty"],
)
def test_bad_emails(client, email):
    assert "email" in field_errors(client.post("/auth/register", json=register_body(email=email)))


def test_email_of_100_characters_is_accepted(client):
    email = "x" * 88 + "@example.com"
    assert len(email) == 100
    response = client.post("/auth/register", json=register_body(email=email))
    assert response.status_code == 201, response.get_json()


@pytest.mark.parametrize(
    "username", ["ab", "x" * 51, "bob smith", "bób", "bob!", "", "a\nb"], ids=lambda u: repr(u)[:12]
)
def test_bad_usernames(client, username):
    assert "username" in field_errors(client.post("/auth/register", json=register_body(username=username)))


@pytest.mark.parametrize("username", ["abc", "x" * 50, "A.b_c-9"])
def test_good_usernames(client, username):
    response = client.post("/auth/register", json=register_body(username=username))
    assert response.status_code == 201, response.get_json()


@pytest.mark.parametrize(
    "password,reason",
    [
        ("short12", "at least 8"),
        ("x" * 129, "at most 128"),
        ("password1", "too common"),
        ("Password1", "too common"),
        ("iloveyou", "too common"),
        ("my-bob_the.builder-1-pass", "username"),
        ("BOBSMITH-secret-99", "email"),
    ],
)
def test_password_policy(client, password, reason):
    body = register_body(password=password)
    if reason == "email":
        body.update(email="bobsmith@example.com", username="builder")
    messages = field_errors(client.post("/auth/register", json=body))["password"]
    assert any(reason in m for m in messages), messages


@pytest.mark.parametrize(
    "password",
    [
        pytest.param("a" * 72, id="72-bytes"),
        pytest.param("a" * 73, id="73-bytes"),
        pytest.param("b" * 100, id="100-bytes"),
        pytest.param("\U0001f600" * 20, id="20-emoji-80-bytes"),
        pytest.param("é" * 128, id="128-code-points-256-bytes"),
        pytest.param("correct horse battery staple", id="spaces"),
    ],
)
def test_long_and_unicode_passwords_register_and_log_in(client, password):
    response = client.post("/auth/register", json=register_body(password=password))
    assert response.status_code == 201, response.get_json()
    login = client.post("/auth/login", json={"username": "bob_the.builder-1", "password": password})
    assert login.status_code == 200
    cut = client.post("/auth/login", json={"username": "bob_the.builder-1", "password": password[:-1]})
    assert_error(cut, 401, "INVALID_CREDENTIALS")


def test_every_character_counts(client):
    first = "q" * 99 + "1" + "z" * 20
    second = "q" * 99 + "2" + "z" * 20
    assert client.post("/auth/register", json=register_body(password=first)).status_code == 201
    response = client.post("/auth/login", json={"username": "bob_the.builder-1", "password": second})
    assert_error(response, 401, "INVALID_CREDENTIALS")


def test_password_is_nfkc_normalised_everywhere(client):
    fullwidth = "ｖｉｏｌｅｔ－ｈａｒｂｏｒ－９９"  # NFKC: violet-harbor-99
    assert client.post("/auth/register", json=register_body(password=fullwidth)).status_code == 201
    response = client.post("/auth/login", json={"username": "bob_the.builder-1", "password": "violet-harbor-99"})
    assert response.status_code == 200


def test_length_is_counted_after_nfkc(client):
    # "ﬃ" (one code point) is "ffi" (three) after NFKC: 3 ligatures make 9 characters.
    assert client.post("/auth/register", json=register_body(password="ﬃ" * 3)).status_code == 201


def test_login_validation(client):
    assert "password" in field_errors(client.post("/auth/login", json={"username": "bob"}))
    assert "email" in field_errors(client.post("/auth/login", json={"email": "nope", "password": "x"}))
    assert "password" in field_errors(client.post("/auth/login", json={"username": "bob", "password": "x" * 129}))


def test_refresh_validation(client):
    assert "refresh_token" in field_errors(client.post("/auth/refresh", json={}))
    assert "refresh_token" in field_errors(client.post("/auth/refresh", json={"refresh_token": 5}))
