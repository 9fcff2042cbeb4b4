"""Every kind of bad token is refused with its contract code."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from helpers import SECRET, assert_error, bearer, pyjwt_decodes

from authapp.auth.keys import hmac_kid


def forge(claims: dict, *, key: str = SECRET, algorithm: str = "HS256", headers: dict | None = None) -> str:
    """A token signed like authapp's own (kid of SECRET, typ by kind) unless told otherwise."""
    typ = "at+jwt" if claims.get("type") == "access" else "JWT"
    return jwt.encode(
        claims, key, algorithm=algorithm, headers={"kid": hmac_kid(SECRET), "typ": typ, **(headers or {})}
    )


def valid_claims(tokens: dict, **changes) -> dict:
    claims = jwt.decode(tokens["access_token"], SECRET, algorithms=["HS256"], audience="authapp")
    claims.update(changes)
    return claims


def unsigned(claims: dict) -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def test_missing_token(client):
    response = client.get("/auth/me")
    assert_error(response, 401, "MISSING_TOKEN")
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_non_bearer_scheme_is_a_missing_token(client, tokens):
    assert_error(client.get("/auth/me", headers={"Authorization": "Basic abc"}), 401, "MISSING_TOKEN")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: unsigned(valid_claims(t)), id="alg-none"),
        pytest.param(lambda t: forge(valid_claims(t), key="another-key-that-is-also-long-enough-!!"), id="wrong-key"),
        pytest.param(lambda t: forge(valid_claims(t, aud="someone-else")), id="wrong-aud"),
        pytest.param(lambda t: forge(valid_claims(t, iss="someone-else")), id="wrong-iss"),
        pytest.param(lambda t: forge(valid_claims(t), algorithm="HS512"), id="wrong-alg"),
        # Signed by the one secret, naming another: the sole key verifies, the kid refuses.
        pytest.param(lambda t: forge(valid_claims(t), headers={"kid": hmac_kid("x" * 40)}), id="right-key-other-kid"),
        pytest.param(lambda t: t["refresh_token"], id="refresh-as-access"),
        pytest.param(lambda t: "not.a.jwt", id="garbage"),
        pytest.param(lambda t: t["access_token"][:-4] + "AAAA", id="tampered-signature"),
    ],
)
def test_bad_access_tokens_are_invalid(client, tokens, make):
    assert_error(client.get("/auth/me", headers=bearer(make(tokens))), 401, "INVALID_TOKEN")


def test_expired_access_token(client, tokens):
    now = int(time.time())
    token = forge(valid_claims(tokens, iat=now - 3600, nbf=now - 3600, exp=now - 10))
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "TOKEN_EXPIRED")


def test_expired_refresh_token(client, tokens):
    now = int(time.time())
    claims = jwt.decode(tokens["refresh_token"], SECRET, algorithms=["HS256"], audience="authapp")
    claims.update(iat=now - 3600, nbf=now - 3600, exp=now - 10)
    response = client.post("/auth/refresh", json={"refresh_token": forge(claims)})
    assert_error(response, 401, "TOKEN_EXPIRED")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t["access_token"], id="access-as-refresh"),
        pytest.param(lambda t: unsigned(valid_claims(t, type="refresh")), id="alg-none"),
        pytest.param(lambda t: forge(valid_claims(t, type="refresh", aud="x")), id="wrong-aud"),
        pytest.param(lambda t: "garbage", id="garbage"),
    ],
)
def test_bad_refresh_tokens_are_invalid(client, tokens, make):
    assert_error(client.post("/auth/refresh", json={"refresh_token": make(tokens)}), 401, "INVALID_TOKEN")


def test_deactivated_user_token(app, client, tokens):
    from authapp.extensions import db
    from authapp.models import User

    with app.app_context():
        db.session.get(User, tokens["user"]["id"]).is_active = False
        db.session.commit()
    assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "USER_INACTIVE")
    response = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_error(response, 401, "USER_INACTIVE")


def test_token_of_a_deleted_user_is_invalid(app, client, tokens):
    from authapp.extensions import db
    from authapp.models import User

    with app.app_context():
        db.session.delete(db.session.get(User, tokens["user"]["id"]))
        db.session.commit()
    assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 401, "INVALID_TOKEN")


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR", "Bearer", " bearer"])
def test_the_bearer_scheme_is_case_insensitive(client, tokens, scheme):
    response = client.get("/auth/me", headers={"Authorization": f"{scheme} {tokens['access_token']}"})
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("header", ["bearer", "bearerx {token}", "Basic {token}", "{token}"])
def test_other_schemes_are_still_missing_tokens(client, tokens, header):
    response = client.get("/auth/me", headers={"Authorization": header.format(token=tokens["access_token"])})
    assert_error(response, 401, "MISSING_TOKEN")


# -- One decode per request -------------------------------------------------------------------


def test_a_protected_request_decodes_its_token_once(app, client, tokens, monkeypatch):
    import flask_jwt_extended.jwt_manager

    calls = pyjwt_decodes(monkeypatch)
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("a second decode"))
    monkeypatch.setattr(
        flask_jwt_extended.jwt_manager.JWTManager,
        "_decode_jwt_from_config",
        lambda *a, **k: pytest.fail("flask-jwt-extended decoded the access token"),
    )
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    assert calls == [tokens["access_token"]]


def test_a_refresh_decodes_its_token_once(app, client, tokens, monkeypatch):
    import flask_jwt_extended.jwt_manager

    calls = pyjwt_decodes(monkeypatch)
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("a second decode"))
    monkeypatch.setattr(jwt, "get_unverified_header", lambda *a, **k: pytest.fail("the header read apart"))
    monkeypatch.setattr(
        flask_jwt_extended.jwt_manager.JWTManager,
        "_decode_jwt_from_config",
        lambda *a, **k: pytest.fail("flask-jwt-extended decoded the refresh token"),
    )
    assert client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 200
    assert calls == [tokens["refresh_token"]]


def test_an_access_token_is_no_refresh_token(client, tokens):
    response = client.post("/auth/refresh", json={"refresh_token": tokens["access_token"]})
    assert_error(response, 401, "INVALID_TOKEN")
    assert response.get_json()["detail"] == "A refresh token is required"
    assert_error(client.get("/auth/me", headers=bearer(tokens["refresh_token"])), 401, "INVALID_TOKEN")


def test_an_expired_token_of_the_wrong_shape_is_invalid_not_expired(client, tokens):
    """The contract's rules come first, as when they were checked before the signature."""
    expired = int(time.time()) - 60
    claims = valid_claims(tokens, exp=expired)
    del claims["aal"]
    assert_error(client.get("/auth/me", headers=bearer(forge(claims))), 401, "INVALID_TOKEN")
    wrong_typ = forge(valid_claims(tokens, exp=expired), headers={"typ": "JWT"})
    assert_error(client.get("/auth/me", headers=bearer(wrong_typ)), 401, "INVALID_TOKEN")
    other_kid = forge(valid_claims(tokens, exp=expired), headers={"kid": hmac_kid("x" * 40)})
    assert_error(client.get("/auth/me", headers=bearer(other_kid)), 401, "INVALID_TOKEN")
    assert_error(client.get("/auth/me", headers=bearer(forge(valid_claims(tokens, exp=expired)))), 401, "TOKEN_EXPIRED")


AUTHORIZATION_HEADERS = [
    None,
    "",
    "   ",
    ",",
    "Bearer",
    "Bearer ",
    "Bearer abc",
    "  Bearer abc  ",
    "Bearer abc,",
    "Bearer a b",
    "Bearer\tabc",
    "Basic xyz, Bearer abc",
    "Bearer abc, Bearer def",
    "Bearer abc,Basic xyz",
    "Basic xyz",
    "bearer abc",
    "BEARER abc",
    "Bearerabc",
    "Token abc",
    ", , Bearer abc",
]


@pytest.mark.parametrize("header", AUTHORIZATION_HEADERS)
def test_the_bearer_header_is_read_as_flask_jwt_extended_reads_it(app, header):
    from flask_jwt_extended.view_decorators import _decode_jwt_from_headers

    from authapp import security

    def outcome(read):
        environ = {} if header is None else {"HTTP_AUTHORIZATION": header}
        with app.test_request_context("/auth/me", environ_base=environ):
            security.canonical_bearer_scheme()  # as the view did before flask-jwt-extended read it
            try:
                return ("token", read())
            except Exception as exc:  # noqa: BLE001 - the exception's kind is the outcome
                return (type(exc).__name__, None)

    assert outcome(security.bearer_token) == outcome(lambda: _decode_jwt_from_headers()[0])
