"""Signing keys: every algorithm end to end, the key set, the operator commands, rotation
of HS* secrets, the private parts kept out of responses, logs and the database in clear,
and the tokens an attacker can make, each refused."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from helpers import SECRET, assert_error, base_settings, bearer
from sqlalchemy import event, select, text

from authapp import create_app
from authapp.auth import keys
from authapp.extensions import db
from authapp.models import SigningKey
from config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"]
ASYMMETRIC = ["RS256", "ES256", "EdDSA"]
NEW_SECRET = "a-new-secret-for-the-rolling-change-0123456789abcdefghijklmnopqr"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def header_of(token: str) -> dict:
    return jwt.get_unverified_header(token)


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def raw_token(header: dict, claims: dict, sign) -> str:
    """A JWS built by hand, so that any header and any signing function can be used."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def kid_in(output: str) -> str:
    return re.search(r"key (\S+) \(", output).group(1)


def activate_new_key(app) -> keys.KeyInfo:
    with app.app_context():
        return keys.generate(activate=True)


def stored_private_key(app, kid: str):
    with app.app_context():
        row = db.session.get(SigningKey, kid)
        return keys.unseal(row.private_key_sealed, kid, row.algorithm, app.config)


@pytest.fixture
def make_app(database_url):
    """Apps on the test's database (several of them are several instances)."""
    made = []

    def make(**settings):
        app = create_app(base_settings(DATABASE_URL=database_url, **settings))
        made.append(app)
        return app

    yield make
    for app in made:
        with app.app_context():
            db.engine.dispose()


def register(client, name: str = "alice") -> dict:
    response = client.post(
        "/auth/register",
        json={"email": f"{name}@example.com", "username": name, "password": "violet-harbor-cactus-42"},
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


# -- Key identifiers -------------------------------------------------------------------


def test_thumbprints_match_rfc_7638():
    # RFC 7638 section 3.1's example key, with members the thumbprint must ignore.
    rfc_key = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKR"
        "XjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZ"
        "gnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqb"
        "w0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert keys.thumbprint(rfc_key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    # An EC key: the members crv, kty, x, y in that order.
    ec_key = {
        "kty": "EC",
        "crv": "P-256",
        "x": "jJ6Flys3zK9jUhnOHf6G49Dyp5hah6CNP84-gY-n9eo",
        "y": "nhI6iD5eFXgBTLt_1p3aip-5VbZeMhxeFSpjfEAf7Ww",
    }
    assert keys.thumbprint(ec_key) == "w9eYdC6_s_tLQ8lH6PUpc0mddazaqtPgeC2IgWDiqY8"


@pytest.mark.parametrize("algorithm", ASYMMETRIC)
def test_a_generated_key_is_named_by_its_thumbprint(algorithm):
    jwk = keys.public_jwk(keys.new_private_key(algorithm), algorithm)
    assert jwk["kid"] == keys.thumbprint(jwk)
    assert jwk["alg"] == algorithm and jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    if algorithm == "RS256":
        assert len(base64.urlsafe_b64decode(jwk["n"] + "==")) * 8 == 3072


def test_the_hmac_kid_is_a_hash_never_the_secret():
    kid = keys.hmac_kid(SECRET)
    assert kid == keys.thumbprint({"kty": "oct", "k": b64(SECRET.encode())})
    assert SECRET not in kid and b64(SECRET.encode()) not in kid
    assert kid != keys.hmac_kid(NEW_SECRET)


# -- Every algorithm, end to end -------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_register_login_refresh_me_logout(make_app, algorithm):
    app = make_app(JWT_ALGORITHM=algorithm)
    if algorithm in ASYMMETRIC:
        info = activate_new_key(app)
    client = app.test_client()
    registered = register(client)
    login = client.post("/auth/login", json={"username": "alice", "password": "violet-harbor-cactus-42"})
    assert login.status_code == 200
    pair = login.get_json()
    for body in (registered, pair):
        access, refresh = header_of(body["access_token"]), header_of(body["refresh_token"])
        assert access["alg"] == refresh["alg"] == algorithm
        assert access["typ"] == "at+jwt" and refresh["typ"] == "JWT"
        expected_kid = info.kid if algorithm in ASYMMETRIC else keys.hmac_kid(SECRET)
        assert access["kid"] == refresh["kid"] == expected_kid
        claims = claims_of(body["access_token"])
        assert set(keys.ACCESS_CLAIMS) <= set(claims)
        assert claims["aal"] == "aal1" and claims["amr"] == ["pwd"] and claims["type"] == "access"
        assert claims["sub"] == str(body["user"]["id"])

    me = client.get("/auth/me", headers=bearer(pair["access_token"]))
    assert me.status_code == 200 and me.get_json()["username"] == "alice"
    refreshed = client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert refreshed.status_code == 200
    new = refreshed.get_json()
    assert client.get("/auth/me", headers=bearer(new["access_token"])).status_code == 200
    assert client.post("/auth/logout", headers=bearer(new["access_token"])).status_code == 204
    assert_error(client.get("/auth/me", headers=bearer(new["access_token"])), 401, "TOKEN_REVOKED")

    key_set = client.get("/.well-known/jwks.json")
    assert key_set.status_code == 200
    assert key_set.headers["Cache-Control"] == "public, max-age=300"
    published = key_set.get_json()["keys"]
    if algorithm in ASYMMETRIC:
        (jwk,) = published
        members = {"RS256": {"kty", "n", "e"}, "ES256": {"kty", "crv", "x", "y"}, "EdDSA": {"kty", "crv", "x"}}
        assert set(jwk) == members[algorithm] | {"kid", "alg", "use"}
        assert jwk["kid"] == info.kid == keys.thumbprint(jwk)
        assert jwk["alg"] == algorithm and jwk["use"] == "sig"
        # The published key alone verifies the token (what another service does).
        verified = jwt.decode(
            new["access_token"], jwt.PyJWK(jwk), algorithms=[algorithm], audience="authapp", issuer="authapp"
        )
        assert verified["sub"] == str(new["user"]["id"])
    else:
        assert published == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sign_gives_what_jwt_encode_gives(make_app, algorithm):
    app = make_app(JWT_ALGORITHM=algorithm)
    if algorithm in ASYMMETRIC:
        activate_new_key(app)
    claims = {"sub": "12", "sid": 's\u00e9ssion "1"', "iat": 1, "exp": 2**31, "amr": ["pwd", "otp"], "type": "access"}
    with app.app_context():
        signing = keys.signing_key()
        for access in (True, False):
            ours = keys.sign(claims, signing, access=access)
            headers = {"kid": signing.kid, "typ": "at+jwt" if access else "JWT"}
            theirs = jwt.encode(claims, signing.signer, algorithm=algorithm, headers=headers)
            if algorithm == "ES256":  # randomised signatures: the same signed part, and it verifies
                assert ours.rsplit(".", 1)[0] == theirs.rsplit(".", 1)[0]
                decoded = jwt.decode(ours, signing.verifier, algorithms=[algorithm], options={"verify_aud": False})
                assert decoded == claims
            else:
                assert ours == theirs


@pytest.mark.parametrize("algorithm", ["HS256", "ES256", "EdDSA", "RS256"])
def test_a_replay_inside_the_reuse_interval_gets_a_working_current_pair(make_app, algorithm):
    app = make_app(JWT_ALGORITHM=algorithm)
    if algorithm in ASYMMETRIC:
        activate_new_key(app)
    client = app.test_client()
    first = register(client)
    current = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]}).get_json()
    replayed = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert replayed.status_code == 200
    again = replayed.get_json()
    # The same claims; ES256 signs them anew (its signatures are randomised), the others
    # give the very same bytes.
    for name in ("access_token", "refresh_token"):
        assert claims_of(again[name]) == claims_of(current[name])
        if algorithm != "ES256":
            assert again[name] == current[name]
    assert client.get("/auth/me", headers=bearer(again["access_token"])).status_code == 200
    assert client.post("/auth/refresh", json={"refresh_token": again["refresh_token"]}).status_code == 200


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_a_replay_inside_the_reuse_interval_after_a_rotation_gets_a_working_pair_of_the_new_key(make_app, algorithm):
    app = make_app(JWT_ALGORITHM=algorithm)
    old_key = activate_new_key(app)
    client = app.test_client()
    first = register(client)
    current = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]}).get_json()
    assert header_of(current["access_token"])["kid"] == old_key.kid
    new_key = activate_new_key(app)  # the rotation, between the refresh and its replay

    replayed = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert replayed.status_code == 200, replayed.get_json()
    again = replayed.get_json()
    for name in ("access_token", "refresh_token"):
        # The session's current pair, with the same claims, signed by the key active now.
        assert header_of(again[name])["kid"] == new_key.kid
        assert claims_of(again[name]) == claims_of(current[name])
    assert claims_of(again["access_token"])["sid"] == claims_of(first["access_token"])["sid"]
    me = client.get("/auth/me", headers=bearer(again["access_token"]))
    assert me.status_code == 200 and me.get_json()["username"] == "alice"
    # The pair of the old key is still good too (that key is standby, not retired).
    assert client.get("/auth/me", headers=bearer(current["access_token"])).status_code == 200
    # The replayed refresh token is the session's head: it refreshes.
    onward = client.post("/auth/refresh", json={"refresh_token": again["refresh_token"]})
    assert onward.status_code == 200 and header_of(onward.get_json()["access_token"])["kid"] == new_key.kid


def test_jwks_answers_304_to_its_etag(make_app):
    app = make_app(JWT_ALGORITHM="EdDSA")
    activate_new_key(app)
    client = app.test_client()
    first = client.get("/.well-known/jwks.json")
    etag = first.headers["ETag"]
    again = client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""
    with app.app_context():
        keys.generate()
    changed = client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert len(changed.get_json()["keys"]) == 2


def test_jwks_is_in_the_openapi_document(client):
    spec = client.get("/openapi.json").get_json()
    operation = spec["paths"]["/.well-known/jwks.json"]["get"]
    assert "200" in operation["responses"] and "304" in operation["responses"]


# -- The contract's token rules, one test each (HS256) ---------------------------------


def resign(token: str, *, claims: dict | None = None, header: dict | None = None, drop=(), drop_header=()) -> str:
    """`token` with changed claims or header, signed again with the test's secret."""
    new_claims = {**claims_of(token), **(claims or {})}
    new_header = {**header_of(token), **(header or {})}
    for name in drop:
        new_claims.pop(name)
    for name in drop_header:
        new_header.pop(name)
    alg = new_header.pop("alg")
    return jwt.encode(new_claims, SECRET, algorithm=alg, headers=new_header)


def test_a_resigned_token_is_accepted_so_the_rules_below_test_one_change_each(client, tokens):
    assert client.get("/auth/me", headers=bearer(resign(tokens["access_token"]))).status_code == 200


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+JWT2", "application/json"])
def test_an_access_token_needs_typ_at_jwt(client, tokens, typ):
    token = resign(tokens["access_token"], drop_header=["typ"]) if typ is None else None
    token = token or resign(tokens["access_token"], header={"typ": typ})
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")


@pytest.mark.parametrize("kind", ["Access", "bogus", "", None, 1, ["access"], {"access": 1}])
def test_an_access_token_needs_type_access_exactly(client, tokens, kind):
    token = resign(tokens["access_token"], claims={"type": kind})
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")


@pytest.mark.parametrize("kind", [["access"], {"refresh": 1}, ["refresh"]])
def test_an_unsigned_token_whose_type_is_not_a_string_is_invalid_everywhere(client, tokens, kind):
    """The shape is checked before the signature: a list or an object there is no 500."""
    segment = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()  # noqa: E731
    token = f"{segment({'alg': 'HS256', 'typ': 'at+jwt', 'kid': 'k'})}.{segment({'type': kind})}.AAAA"
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")
    assert_error(client.post("/auth/refresh", json={"refresh_token": token}), 401, "INVALID_TOKEN")
    logout = client.post("/auth/logout", headers=bearer(tokens["access_token"]), json={"refresh_token": token})
    assert logout.status_code == 204


def test_an_access_token_without_type_is_refused(client, tokens):
    token = resign(tokens["access_token"], drop=["type"])
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")


@pytest.mark.parametrize("sub", [" 1", "1 ", "+1", "01", "1_0", "\u0661", "1\n", 1, "0x1", "", "1" + "0" * 18])
def test_sub_must_be_decimal_digits_only(client, tokens, sub):
    assert tokens["user"]["id"] == 1
    token = resign(tokens["access_token"], claims={"sub": sub})
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")


def test_sub_has_at_most_18_digits():
    assert keys.is_user_id("1") and keys.is_user_id("9" * 18)
    assert not keys.is_user_id("1" * 19)


@pytest.mark.parametrize("claim", keys.ACCESS_CLAIMS)
def test_every_contract_claim_must_be_present(client, tokens, claim):
    token = resign(tokens["access_token"], drop=[claim])
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")


@pytest.mark.parametrize("claim", keys.REFRESH_CLAIMS)
def test_every_refresh_token_claim_must_be_present(client, tokens, claim):
    token = resign(tokens["refresh_token"], drop=[claim])
    assert_error(client.post("/auth/refresh", json={"refresh_token": token}), 401, "INVALID_TOKEN")


def test_a_refresh_token_with_typ_at_jwt_is_refused(client, tokens):
    token = resign(tokens["refresh_token"], header={"typ": "at+jwt"})
    assert_error(client.post("/auth/refresh", json={"refresh_token": token}), 401, "INVALID_TOKEN")


def test_an_access_token_needs_a_kid(client, tokens):
    token = resign(tokens["access_token"], drop_header=["kid"])
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")


def test_a_refresh_token_minted_before_kids_existed_still_refreshes(client, tokens):
    # What tokens looked like before this release: no kid, PyJWT's typ.
    claims = claims_of(tokens["refresh_token"])
    legacy = jwt.encode(claims, SECRET, algorithm="HS256")
    assert "kid" not in header_of(legacy)
    assert client.post("/auth/refresh", json={"refresh_token": legacy}).status_code == 200


def test_a_refresh_token_without_a_kid_is_verified_with_jwt_secret_key_only(make_app):
    # With previous secrets the key is found by kid, not as the sole key: a token without
    # one is still JWT_SECRET_KEY's, never a previous secret's.
    app = make_app(JWT_SECRET_KEY=NEW_SECRET, JWT_PREVIOUS_SECRET_KEYS=SECRET)
    client = app.test_client()
    claims = claims_of(register(client)["refresh_token"])
    assert client.post("/auth/refresh", json={"refresh_token": jwt.encode(claims, NEW_SECRET)}).status_code == 200
    by_previous = jwt.encode({**claims, "jti": "0" * 32}, SECRET)
    assert_error(client.post("/auth/refresh", json={"refresh_token": by_previous}), 401, "INVALID_TOKEN")


@pytest.mark.parametrize(
    "extra",
    [
        {"jwk": {"kty": "oct", "k": b64(b"attacker")}},
        {"jku": "https://attacker.example/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
        {"x5c": ["MIIB"]},
        {"crit": ["exp"]},
    ],
    ids=["jwk", "jku", "x5u", "x5c", "crit"],
)
def test_header_parameters_beyond_alg_typ_kid_are_refused(client, tokens, extra):
    token = resign(tokens["access_token"], header=extra)
    assert_error(client.get("/auth/me", headers=bearer(token)), 401, "INVALID_TOKEN")


# -- HS*: a rolling change of JWT_SECRET_KEY -------------------------------------------


def test_previous_secrets_still_verify_and_replays_follow_chains_across_the_change(make_app):
    old = make_app()
    old_client = old.test_client()
    session = register(old_client)
    child = old_client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]}).get_json()

    new = make_app(JWT_SECRET_KEY=NEW_SECRET, JWT_PREVIOUS_SECRET_KEYS=SECRET)
    client = new.test_client()
    # Tokens of the old secret keep working.
    assert client.get("/auth/me", headers=bearer(child["access_token"])).status_code == 200
    # A replay of the first token, inside the interval: the chain link derived under the
    # old secret is found, and the session's current pair comes back (signed anew).
    replayed = client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert replayed.status_code == 200, replayed.get_json()
    assert claims_of(replayed.get_json()["refresh_token"])["jti"] == claims_of(child["refresh_token"])["jti"]
    assert header_of(replayed.get_json()["access_token"])["kid"] == keys.hmac_kid(NEW_SECRET)
    # One more link, under the new secret; a replay of the first walks both.
    grandchild = client.post("/auth/refresh", json={"refresh_token": child["refresh_token"]}).get_json()
    again = client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert again.status_code == 200
    assert claims_of(again.get_json()["refresh_token"])["jti"] == claims_of(grandchild["refresh_token"])["jti"]
    assert client.get("/auth/me", headers=bearer(grandchild["access_token"])).status_code == 200

    # Once the old secret is dropped, its tokens are refused.
    newest = make_app(JWT_SECRET_KEY=NEW_SECRET)
    assert_error(newest.test_client().get("/auth/me", headers=bearer(child["access_token"])), 401, "INVALID_TOKEN")


# -- The operator commands --------------------------------------------------------------


@pytest.fixture
def cli(make_app):
    app = make_app(JWT_ALGORITHM="EdDSA")
    runner = app.test_cli_runner()

    def invoke(*args):
        return runner.invoke(args=["keys", *args])

    invoke.app = app
    return invoke


@pytest.mark.parametrize("command", ["generate", "activate", "retire", "list"])
def test_every_keys_command_has_help(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


@pytest.mark.parametrize("command", [["activate"], ["retire"], ["retire", "--force"]])
def test_a_kid_that_begins_with_a_dash_is_a_kid(cli, command):
    # Thumbprints are base64url: "-" is one of their 64 letters, first letter included.
    cli("generate", "--activate")
    result = cli(*command, "-Xq3abcdefghijklmnopqrstuvwxyzABCDEFGHIJK")
    assert result.exit_code == 1, result.output  # "no such key", not a usage error (2)
    assert "-Xq3abcdefghijklmnopqrstuvwxyzABCDEFGHIJK" in result.output and "No such option" not in result.output


def test_key_lifecycle_through_the_commands(cli, caplog):
    caplog.set_level(logging.INFO, logger="authapp.audit")
    app = cli.app
    client = app.test_client()
    assert_error(client.post("/auth/register", json={}), 400, "VALIDATION_ERROR")

    first = cli("generate", "--activate")
    assert first.exit_code == 0, first.output
    first_kid = kid_in(first.output)
    standby = cli("generate")
    assert standby.exit_code == 0 and "standby" in standby.output
    second_kid = kid_in(standby.output)

    listed = cli("list").output.splitlines()
    assert [line.split("\t")[:3] for line in listed] == [
        [first_kid, "EdDSA", "active"],
        [second_kid, "EdDSA", "standby"],
    ]
    # Standby: published, not signing.
    published = {k["kid"] for k in client.get("/.well-known/jwks.json").get_json()["keys"]}
    assert published == {first_kid, second_kid}
    session = register(client)
    assert header_of(session["access_token"])["kid"] == first_kid

    activated = cli("activate", second_kid)
    assert activated.exit_code == 0 and f"activated key {second_kid}" in activated.output
    assert "warning: key" in activated.output  # it was published a moment ago
    assert header_of(register(client, "bob")["access_token"])["kid"] == second_kid
    # The previous key keeps verifying the tokens it signed.
    assert client.get("/auth/me", headers=bearer(session["access_token"])).status_code == 200

    # Retiring: never the active key; not a key whose tokens may still be valid, unless forced.
    refused = cli("retire", second_kid)
    assert refused.exit_code == 1 and "active key" in refused.output
    young = cli("retire", first_kid)
    assert young.exit_code == 1 and "valid until" in young.output and "--force" in young.output
    retired = cli("retire", first_kid, "--force")
    assert retired.exit_code == 0, retired.output
    assert [k["kid"] for k in client.get("/.well-known/jwks.json").get_json()["keys"]] == [second_kid]
    assert_error(client.get("/auth/me", headers=bearer(session["access_token"])), 401, "INVALID_TOKEN")
    with app.app_context():
        assert db.session.get(SigningKey, first_kid).private_key_sealed is None
    again = cli("activate", first_kid)
    assert again.exit_code == 1 and "retired" in again.output

    unknown = cli("activate", "no-such-kid")
    assert unknown.exit_code == 1 and unknown.output.strip() == "Error: No signing key 'no-such-kid' (see `keys list`)"

    events = [(r.event, r.kid) for r in caplog.records if getattr(r, "event", "").startswith("signing_key_")]
    assert events == [
        (keys.KEY_GENERATED, first_kid),
        (keys.KEY_ACTIVATED, first_kid),
        (keys.KEY_GENERATED, second_kid),
        (keys.KEY_ACTIVATED, second_kid),
        (keys.KEY_RETIRED, first_kid),
    ]


def test_hmac_deployments_have_no_keys_to_generate(make_app):
    result = make_app().test_cli_runner().invoke(args=["keys", "generate"])
    assert result.exit_code == 1
    assert "JWT_ALGORITHM=HS256 signs with JWT_SECRET_KEY" in result.output


def test_the_database_allows_one_active_key_only(cli):
    assert cli("generate", "--activate").exit_code == 0
    assert cli("generate").exit_code == 0
    with cli.app.app_context():
        standby = db.session.scalar(select(SigningKey).where(SigningKey.state == "standby"))
        standby.state = "active"
        with pytest.raises(Exception, match="(?i)unique"):
            db.session.commit()
        db.session.rollback()


def test_a_key_sealed_with_a_secret_no_longer_configured_is_a_clear_503_and_stops_production(make_app):
    """JWT_SECRET_KEY changed without the old one in JWT_PREVIOUS_SECRET_KEYS."""
    activate_new_key(make_app(JWT_ALGORITHM="EdDSA"))
    other_secret = "another-secret-that-is-long-enough-for-hs512-0123456789abcdefghi"
    app = make_app(JWT_ALGORITHM="EdDSA", JWT_SECRET_KEY=other_secret)
    account = {"email": "a@example.com", "username": "alice", "password": "violet-harbor-cactus-42"}
    body = assert_error(app.test_client().post("/auth/register", json=account), 503, "SERVICE_UNAVAILABLE")
    assert "JWT_SECRET_KEY" not in body["detail"]  # the client is told nothing of the configuration
    app.config["ENVIRONMENT"] = "production"
    with pytest.raises(ConfigError, match="neither JWT_SECRET_KEY nor in JWT_PREVIOUS_SECRET_KEYS"):
        keys.require_signing_key(app)


def test_without_an_active_key_nothing_is_signed_and_the_answer_says_what_to_run(make_app):
    app = make_app(JWT_ALGORITHM="EdDSA")
    account = {"email": "a@example.com", "username": "alice", "password": "violet-harbor-cactus-42"}
    response = app.test_client().post("/auth/register", json=account)
    body = assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert "keys generate --activate" in body["detail"]
    assert response.headers["Retry-After"] == "60"


def test_a_production_start_without_an_active_key_stops_with_the_command_to_run(database_url, backend):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "ENVIRONMENT", "FLASK_"))}
    env.update(
        ENVIRONMENT="production",
        JWT_SECRET_KEY=SECRET,
        JWT_ALGORITHM="EdDSA",
        DATABASE_URL=database_url,
        MAIL_URL="smtp://127.0.0.1:1",
        MAIL_FROM="authapp@example.com",
        FRONTEND_URL="https://app.example.com",
        PYTHONPATH=str(ROOT),
    )
    start = [sys.executable, "-c", "import wsgi"]
    result = subprocess.run(start, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "authapp: configuration error: no active signing key for JWT_ALGORITHM=EdDSA: "
        "run `flask --app wsgi keys generate --activate`"
    ]
    # The command it names works, through the same wsgi module, and then the start does.
    flask = [sys.executable, "-m", "flask", "--app", "wsgi", "keys", "generate", "--activate"]
    generated = subprocess.run(flask, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    assert subprocess.run(start, cwd=ROOT, env=env, capture_output=True, timeout=60).returncode == 0


# -- Private parts: never in a response, a log line or the database in clear ------------


@pytest.mark.parametrize("algorithm", ASYMMETRIC)
def test_the_private_part_is_never_shown(make_app, algorithm, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    app = make_app(JWT_ALGORITHM=algorithm)
    runner = app.test_cli_runner()
    generated = runner.invoke(args=["keys", "generate", "--activate"])
    kid = kid_in(generated.output)
    listed = runner.invoke(args=["keys", "list"])
    client = app.test_client()
    tokens = register(client)
    responses = [
        client.get("/.well-known/jwks.json").data,
        client.get("/auth/me", headers=bearer(tokens["access_token"])).data,
        client.get("/openapi.json").data,
        json.dumps(tokens).encode(),
    ]
    private = stored_private_key(app, kid)
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(private))
    secrets_ = [private_jwk["d"], pem.decode().splitlines()[1]]
    if algorithm == "RS256":
        secrets_ += [private_jwk["p"], private_jwk["q"]]
    seen_text = (
        "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
        + generated.output
        + listed.output
        + "".join(capfd.readouterr())
    )
    for secret in secrets_:
        assert secret not in seen_text
        assert all(secret.encode() not in body for body in responses)

    # The database: every column of every row, as raw bytes and text.
    with app.app_context():
        rows = db.session.execute(text("SELECT * FROM signing_keys")).all()
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for row in rows for v in row)
    assert der not in stored and der[-32:] not in stored
    for secret in secrets_:
        assert secret.encode() not in stored
    # Sealed with AES-GCM bound to its row: another kid (or a wrong secret) does not open it.
    with app.app_context():
        sealed = db.session.get(SigningKey, kid).private_key_sealed
    with pytest.raises(keys.UnsealableKey):
        keys.unseal(sealed, "another-kid", algorithm, app.config)
    with pytest.raises(keys.UnsealableKey):
        keys.unseal(sealed, kid, algorithm, {"JWT_SECRET_KEY": NEW_SECRET})
    assert keys.unseal(sealed, kid, algorithm, {"JWT_SECRET_KEY": NEW_SECRET, "JWT_PREVIOUS_SECRET_KEYS": [SECRET]})


# -- Attacks, each refused with INVALID_TOKEN --------------------------------------------


@pytest.fixture
def eddsa(make_app):
    app = make_app(JWT_ALGORITHM="EdDSA")
    info = activate_new_key(app)
    client = app.test_client()
    return app, client, info, register(client)


def _sign_with(private, algorithm: str, header: dict, claims: dict) -> str:
    return jwt.encode(claims, private, algorithm=algorithm, headers=header)


def _attack_base(info, tokens) -> tuple[dict, dict]:
    """The header (less `alg`) and claims every attack token starts from: the real token's."""
    return {"kid": info.kid, "typ": "at+jwt"}, claims_of(tokens["access_token"])


def _attack_tokens(app, info, tokens) -> dict[str, str]:
    header, claims = _attack_base(info, tokens)
    jwk = next(k for k in app.test_client().get("/.well-known/jwks.json").get_json()["keys"])
    public_pem = jwt.PyJWK(jwk).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    attacker = ed25519.Ed25519PrivateKey.generate()
    attacker_jwk = keys.public_jwk(attacker, "EdDSA")
    other_deployment = ed25519.Ed25519PrivateKey.generate()
    return {
        # Key confusion: the public key (PEM, or its JWK) used as an HMAC secret.
        "hs256-with-public-pem": raw_token(
            {"alg": "HS256", **header}, claims, lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()
        ),
        "hs256-with-public-jwk": raw_token(
            {"alg": "HS256", **header},
            claims,
            lambda m: hmac.new(json.dumps(jwk).encode(), m, hashlib.sha256).digest(),
        ),
        "alg-none": raw_token({"alg": "none", **header}, claims, lambda m: b""),
        "unknown-kid": _sign_with(attacker, "EdDSA", {**header, "kid": attacker_jwk["kid"]}, claims),
        "embedded-jwk": _sign_with(attacker, "EdDSA", {**header, "jwk": attacker_jwk}, claims),
        "embedded-jwk-own-kid": _sign_with(
            attacker, "EdDSA", {**header, "kid": attacker_jwk["kid"], "jwk": attacker_jwk}, claims
        ),
        "jku": _sign_with(attacker, "EdDSA", {**header, "jku": "http://127.0.0.1:9/jwks.json"}, claims),
        "x5u": _sign_with(attacker, "EdDSA", {**header, "x5u": "http://127.0.0.1:9/cert.pem"}, claims),
        "es256-when-eddsa": _sign_with(ec.generate_private_key(ec.SECP256R1()), "ES256", header, claims),
        "another-deployments-key-same-kid": _sign_with(other_deployment, "EdDSA", header, claims),
    }


ATTACKS = [
    "hs256-with-public-pem",
    "hs256-with-public-jwk",
    "alg-none",
    "unknown-kid",
    "embedded-jwk",
    "embedded-jwk-own-kid",
    "jku",
    "x5u",
    "es256-when-eddsa",
    "another-deployments-key-same-kid",
]


def test_the_attack_helpers_with_the_real_key_make_accepted_tokens(eddsa):
    """The control of the attacks below: the same helpers, header and claims, signed by the
    active key itself, are accepted; so each attack is refused for what it changes."""
    app, client, info, tokens = eddsa
    header, claims = _attack_base(info, tokens)
    real = stored_private_key(app, info.kid)
    with app.app_context():
        assert keys.signing_key().kid == info.kid
    by_hand = raw_token({"alg": "EdDSA", **header}, claims, real.sign)
    by_pyjwt = _sign_with(real, "EdDSA", header, claims)
    for token in (by_hand, by_pyjwt):
        response = client.get("/auth/me", headers=bearer(token))
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["username"] == "alice"


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_are_invalid_tokens(eddsa, attack):
    app, client, info, tokens = eddsa
    forged = _attack_tokens(app, info, tokens)[attack]
    assert_error(client.get("/auth/me", headers=bearer(forged)), 401, "INVALID_TOKEN")


def test_a_token_of_another_deployment_is_refused(eddsa, database_factory, tmp_path, request):
    app, client, _info, _tokens = eddsa
    with database_factory("sqlite", request, tmp_path) as other_url:
        other = create_app(base_settings(DATABASE_URL=other_url, JWT_ALGORITHM="EdDSA"))
        activate_new_key(other)
        theirs = register(other.test_client(), "mallory")
        with other.app_context():
            db.engine.dispose()
    # Same user id, same issuer and audience: only the key differs.
    assert claims_of(theirs["access_token"])["sub"] == "1"
    assert_error(client.get("/auth/me", headers=bearer(theirs["access_token"])), 401, "INVALID_TOKEN")


def test_unknown_kids_reload_the_key_set_at_most_once_per_bound(eddsa, monkeypatch):
    app, client, _info, tokens = eddsa
    loads = []
    real = keys._load_key_set
    monkeypatch.setattr(keys, "_load_key_set", lambda config: loads.append(1) or real(config))
    # The bound as this loop sees it, whatever the machine's speed: one reload, then none.
    keyring = keys.ring(app)
    keyring._last_attempt = float("-inf")
    monkeypatch.setattr(keyring, "unknown_kid_interval", 3600)
    claims = claims_of(tokens["access_token"])
    for _ in range(20):
        attacker = ed25519.Ed25519PrivateKey.generate()
        kid = keys.public_jwk(attacker, "EdDSA")["kid"]
        forged = _sign_with(attacker, "EdDSA", {"kid": kid, "typ": "at+jwt"}, claims)
        assert_error(client.get("/auth/me", headers=bearer(forged)), 401, "INVALID_TOKEN")
    assert len(loads) == 1


def _due_for_a_reload(keyring: keys.KeyRing) -> None:
    """The process's key set as it is once the reload interval and the bound on retries
    have passed: its next use reads the table again."""
    keyring._set = dataclasses.replace(keyring._set, loaded_at=time.monotonic() - keyring.interval - 1)
    keyring._last_attempt = float("-inf")


@contextmanager
def database_failing(engine, outage: str) -> Iterator[None]:
    """The driver's own OperationalError, as when the server is lost: on every new
    connection ("unreachable": the pool emptied first), or on the signing keys' read only
    ("key read fails": every other statement goes through)."""
    error = engine.dialect.loaded_dbapi.OperationalError

    def refuse_connection(*_args):
        raise error("could not connect to server")

    def refuse_key_read(_conn, _cursor, statement, *_args):
        if "signing_keys" in statement:
            raise error("server closed the connection unexpectedly")

    if outage == "unreachable":
        engine.dispose()
        name, listener = "do_connect", refuse_connection
    else:
        name, listener = "before_cursor_execute", refuse_key_read
    event.listen(engine, name, listener)
    try:
        yield
    finally:
        event.remove(engine, name, listener)


@pytest.mark.parametrize("outage", ["unreachable", "key read fails"])
def test_a_reload_that_cannot_read_the_keys_keeps_the_known_ones_and_their_tokens_verify(make_app, outage, caplog):
    """A periodic reload of the key set while the database is out of reach (or the read of
    the keys fails): the process keeps serving and verifying with the keys it knew."""
    caplog.set_level(logging.WARNING, logger="authapp.keys")
    app = make_app(JWT_ALGORITHM="EdDSA", CIRCUIT_BREAKER_THRESHOLD=1000)
    info = activate_new_key(app)
    client = app.test_client()
    tokens = register(client)
    keyring = keys.ring(app)
    with app.app_context():
        keyring.current()
        engine = db.engine
    with make_app(JWT_ALGORITHM="EdDSA").app_context():
        standby = keys.generate()  # another instance's command: this process has not read it yet

    def failed_reloads() -> int:
        return sum(getattr(r, "event", "") == "signing_keys_reload_failed" for r in caplog.records)

    def published() -> set[str]:
        answer = client.get("/.well-known/jwks.json")
        assert answer.status_code == 200, answer.get_json()
        return {k["kid"] for k in answer.get_json()["keys"]}

    with database_failing(engine, outage):
        _due_for_a_reload(keyring)
        if keyring.verified is not None:
            keyring.verified.clear()  # the token's signature is checked now, with the kept key
        if outage == "unreachable":
            with app.test_request_context():
                assert keys.decode_access_token(tokens["access_token"])["sub"] == "1"
            assert failed_reloads() == 1  # that verification tried the table, and used the kept key
            # The session cannot be read: the outage is a 503, not a logout.
            assert_error(client.get("/auth/me", headers=bearer(tokens["access_token"])), 503, "SERVICE_UNAVAILABLE")
        else:
            me = client.get("/auth/me", headers=bearer(tokens["access_token"]))
            assert me.status_code == 200, me.get_json()
        assert failed_reloads() == 1
        assert published() == {info.kid}  # the keys it knew, not an empty set
        assert failed_reloads() == 1  # retried after the bound (5 s), not at every request

    _due_for_a_reload(keyring)  # the bound has passed, the database answers again
    assert published() == {info.kid, standby.kid}
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    assert failed_reloads() == 1


def test_a_key_activated_elsewhere_is_found_at_once_by_its_kid(make_app):
    one = make_app(JWT_ALGORITHM="EdDSA", JWT_KEYS_RELOAD_SECONDS=3600)
    two = make_app(JWT_ALGORITHM="EdDSA", JWT_KEYS_RELOAD_SECONDS=3600)
    activate_new_key(one)
    tokens = register(one.test_client())
    two.extensions["authapp_keys"]._last_attempt = float("-inf")
    with two.app_context():
        keys.ring(two).current()  # two has loaded the old set (with this key): now rotate in one
    new = activate_new_key(one)
    fresh = register(one.test_client(), "bob")
    assert header_of(fresh["access_token"])["kid"] == new.kid
    two.extensions["authapp_keys"]._last_attempt = float("-inf")  # the bound has passed
    assert two.test_client().get("/auth/me", headers=bearer(fresh["access_token"])).status_code == 200
    assert two.test_client().get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200


def test_signing_keys_survive_a_change_of_secret(make_app):
    app = make_app(JWT_ALGORITHM="ES256")
    activate_new_key(app)
    tokens = register(app.test_client())
    moved = make_app(JWT_ALGORITHM="ES256", JWT_SECRET_KEY=NEW_SECRET, JWT_PREVIOUS_SECRET_KEYS=SECRET)
    client = moved.test_client()
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    # The sealed private key opened with the previous secret: it still signs.
    assert client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 200
