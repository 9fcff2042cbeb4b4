"""Every kind of bad token is refused with its contract code."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from helpers import SECRET, assert_error, bearer
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS

from authapp.auth import pyjwt_speedup
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


# -- PyJWT's segment check at C speed (authapp/auth/pyjwt_speedup.py) ----------------------

SEGMENT_BYTES = st.binary(max_size=24) | st.text(alphabet="AZaz09-_=+/!. \x00é", max_size=24).map(str.encode)


def _outcome(function, segment: bytes):
    try:
        return ("ok", function(segment, "payload"))
    except jwt.exceptions.DecodeError as exc:
        return ("DecodeError", str(exc))


@settings(max_examples=3000, deadline=None)
@given(segment=SEGMENT_BYTES)
@example(segment=b"!!!!")
@example(segment=b"eyJ9")
@example(segment=b"eyJ9=")
@example(segment=b"eQ==")
@example(segment=b"eQ===")
@example(segment=b"eR")  # a non-canonical last character: decodes, but not to itself
@example(segment=b"e")
@example(segment=b"ab+/")
@example(segment=b"")
def test_the_fast_segment_check_agrees_with_pyjwt(segment):
    pyjwt_speedup.install()
    assert pyjwt_speedup.original is not None
    assert _outcome(pyjwt_speedup.decode_base64url_segment, segment) == _outcome(pyjwt_speedup.original, segment)


def test_the_fast_segment_check_is_installed_for_the_pinned_pyjwt(app):
    assert jwt.__version__ == pyjwt_speedup.WRITTEN_FOR, "requirements.txt pins the release it was written for"
    assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is pyjwt_speedup.decode_base64url_segment
    assert pyjwt_speedup.BASE64URL_ALPHABET == jwt.api_jws._BASE64URL_ALPHABET


def test_the_fast_segment_check_stays_out_of_other_pyjwt_releases(app, monkeypatch):
    own = pyjwt_speedup.original
    assert own is not None
    monkeypatch.setattr(PyJWS, "_decode_base64url_segment", staticmethod(own))
    monkeypatch.setattr(jwt, "__version__", "9.9.9")
    assert pyjwt_speedup.install() is False
    assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is own
    # A release without the private function: no error, nothing installed.
    monkeypatch.setattr(jwt, "__version__", pyjwt_speedup.WRITTEN_FOR)
    monkeypatch.delattr(PyJWS, "_decode_base64url_segment")
    assert pyjwt_speedup.install() is False
