"""The speed-ups of authapp/speedups.py: each installed by default, each agreeing with the
library code it replaces, each off with SPEEDUPS, and a warning when one cannot install."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import flask_limiter
import jwt
import pytest
from flask import Flask
from flask_limiter import Limiter
from helpers import assert_error, base_settings, bearer, pyjwt_decodes
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jwt.api_jws import PyJWS
from sqlalchemy import text

from authapp import create_app, speedups
from authapp.extensions import limiter


def test_all_are_installed_by_default(app):
    assert app.extensions["authapp.speedups"] == dict.fromkeys(speedups.NAMES, True)
    assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is speedups.decode_base64url_segment
    assert logging._srcfile is None and logging.logThreads is False


def test_none_puts_the_libraries_own_code_back(app, database_url):
    off = create_app(base_settings(DATABASE_URL=database_url, SPEEDUPS="none"))
    try:
        assert off.extensions["authapp.speedups"] == dict.fromkeys(speedups.NAMES, False)
        assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is speedups.original
        assert logging._srcfile is not None and logging.logThreads is True
        assert "ensure_sync" not in vars(off)  # Flask's own method
        assert off.test_client().get("/health/live").status_code == 200
    finally:
        speedups.install(app, speedups.NAMES)  # the process-wide ones back for the other tests


def test_a_list_names_the_ones_to_use(database_url):
    app = create_app(base_settings(DATABASE_URL=database_url, SPEEDUPS="sync_callables"))
    try:
        assert app.extensions["authapp.speedups"] == {
            "sync_callables": True,
            "lean_log_records": False,
            "pyjwt_segments": False,
            "limiter_hooks": False,
            "hmac_keys": False,
            "verified_tokens": False,
            "app_hooks": False,
        }
    finally:
        speedups.install(app, speedups.NAMES)


# -- sync_callables -------------------------------------------------------------------------


def test_sync_callables_agree_with_flask(app, client, tokens):
    plain = Flask("plain")

    def view():
        return "ok"

    async def coroutine_view():
        return "ok"

    assert app.ensure_sync(view) is plain.ensure_sync(view) is view
    assert app.ensure_sync(view) is app.ensure_sync(view)

    # A coroutine function still goes to Flask's own handling (which wants asgiref).
    def outcome(ensure_sync):
        try:
            return ("ok", ensure_sync(coroutine_view)())
        except RuntimeError as exc:
            return ("RuntimeError", str(exc))

    assert outcome(app.ensure_sync) == outcome(plain.ensure_sync)
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200


# -- lean_log_records -------------------------------------------------------------------------


def test_lean_log_records_leave_our_lines_as_they_were(app, log_lines):
    logger = logging.getLogger("authapp.test")

    def line() -> dict:
        logger.warning("same line", extra={"event": "x", "n": 1})
        entry = log_lines()[-1]
        entry.pop("timestamp")
        return entry

    speedups.lean_log_records(False)
    try:
        without = line()
    finally:
        speedups.lean_log_records(True)
    assert line() == without


# -- pyjwt_segments ---------------------------------------------------------------------------

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
    speedups.pyjwt_segments()
    assert speedups.original is not None
    assert _outcome(speedups.decode_base64url_segment, segment) == _outcome(speedups.original, segment)


def test_the_fast_segment_check_is_written_for_the_pinned_pyjwt(app):
    assert jwt.__version__ == speedups.WRITTEN_FOR, "requirements.txt pins the release it was written for"
    assert speedups.BASE64URL_ALPHABET == jwt.api_jws._BASE64URL_ALPHABET


def test_the_fast_segment_check_stays_out_of_other_pyjwt_releases(app, monkeypatch, log_lines):
    own = speedups.original
    assert own is not None
    monkeypatch.setattr(PyJWS, "_decode_base64url_segment", staticmethod(own))
    monkeypatch.setattr(jwt, "__version__", "9.9.9")
    assert speedups.pyjwt_segments() is False
    assert PyJWS.__dict__["_decode_base64url_segment"].__func__ is own
    installed = speedups.install(app, speedups.NAMES)
    assert installed["pyjwt_segments"] is False
    (warning,) = [e for e in log_lines() if e.get("event") == "speedup_not_installed"]
    assert warning["speedup"] == "pyjwt_segments" and warning["level"] == "WARNING"
    # A release without the private function: no error, nothing installed.
    monkeypatch.setattr(jwt, "__version__", speedups.WRITTEN_FOR)
    monkeypatch.delattr(PyJWS, "_decode_base64url_segment")
    assert speedups.pyjwt_segments() is False


# -- limiter_hooks ----------------------------------------------------------------------------


def _limiter_hooks(app) -> list:
    """Flask-Limiter's own hooks still in `app` (before, after, teardown)."""
    found = [f for f in app.before_request_funcs.get(None, []) if f == limiter._check_request_limit]
    found += [f for f in app.after_request_funcs.get(None, []) if getattr(f, "args", None) == (limiter,)]
    found += [f for f in app.teardown_request_funcs.get(None, []) if f == limiter._Limiter__release_context]
    return found


LIMITED = {"RATELIMIT_ENABLED": "true", "LOGIN_RATE_LIMIT": "3/minute", "LOGIN_MAX_FAILURES": "100"}


def _statuses(app) -> list[int]:
    """A run of login attempts from two addresses and unlimited requests in between."""
    client = app.test_client()
    account = {"email": "hooks@example.com", "username": "hooks", "password": "correct horse battery staple 9"}
    assert client.post("/auth/register", json=account).status_code == 201
    statuses = []
    for address in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.1", "127.0.0.2"):
        statuses.append(client.get("/health/live", environ_base={"REMOTE_ADDR": address}).status_code)
        login = {"username": "hooks", "password": "wrong password, surely"}
        statuses.append(client.post("/auth/login", json=login, environ_base={"REMOTE_ADDR": address}).status_code)
    return statuses


def test_limiter_hooks_are_out_and_the_limits_stay_as_they_were(database_url, tmp_path):
    def made(speedups_setting: str, name: str):
        url = database_url if speedups_setting == "all" else f"sqlite:///{tmp_path / name}.db"
        app = create_app(base_settings(DATABASE_URL=url, SPEEDUPS=speedups_setting, **LIMITED))
        if speedups_setting != "all":
            from authapp.extensions import db

            with app.app_context():
                db.create_all()
        return app

    fast = made("all", "fast")
    try:
        assert fast.extensions["authapp.speedups"]["limiter_hooks"] is True
        assert _limiter_hooks(fast) == []
        with_speedup = _statuses(fast)
        own = made("none", "own")  # the limiter is shared: its counters start again (memory://)
        assert len(_limiter_hooks(own)) == 3
        assert with_speedup == _statuses(own) == [200, 401, 200, 401, 200, 401, 200, 401, 200, 429, 200, 401]
    finally:
        speedups.install(fast, speedups.NAMES)


def test_limiter_hooks_stay_when_a_limit_needs_them():
    app = Flask("defaults")
    app.config.update(RATELIMIT_ENABLED=True, RATELIMIT_STORAGE_URI="memory://")
    own = Limiter(key_func=lambda: "k", default_limits=["1/minute"], app=app)
    assert speedups.limiter_needs_its_hooks(own)
    assert speedups.drop_limiter_hooks(app, own) is False
    assert own._check_request_limit in app.before_request_funcs[None]
    app.get("/")(lambda: "ok")
    client = app.test_client()
    assert [client.get("/").status_code for _ in range(2)] == [200, 429]  # the default limit still applies


def test_limiter_hooks_stay_with_another_flask_limiter_release(database_url, monkeypatch, log_lines):
    monkeypatch.setattr(flask_limiter, "__version__", "9.9.9")
    app = create_app(base_settings(DATABASE_URL=database_url, **LIMITED))
    try:
        assert app.extensions["authapp.speedups"]["limiter_hooks"] is False
        assert len(_limiter_hooks(app)) == 3
        (warning,) = [e for e in log_lines() if e.get("event") == "speedup_not_installed"]
        assert warning["speedup"] == "limiter_hooks"
    finally:
        speedups.install(app, speedups.NAMES)


@pytest.mark.parametrize("settings", [{"RATELIMIT_ENABLED": "false"}])
def test_limiter_hooks_with_the_limits_off(app):
    assert app.extensions["authapp.speedups"]["limiter_hooks"] is True
    assert _limiter_hooks(app) == []


# -- The hot path's own: the user out, the liveness body, the security headers ---------------

_WHEN = st.datetimes(timezones=st.just(UTC), min_value=datetime(1970, 1, 2), max_value=datetime(9998, 1, 1))
# A session check's user and level, as the serializers take them.
_USER_ROW = {
    "user_id": st.integers(min_value=1, max_value=2**53),
    "text": st.text(max_size=40),
    "active": st.booleans(),
    "created": _WHEN,
    "last_login": st.none() | _WHEN,
    "verified": st.none() | _WHEN,
    "mfa_since": st.none() | _WHEN,
    "aal": st.sampled_from(["aal1", "aal2"]),
}


@settings(max_examples=300, deadline=None)
@given(**_USER_ROW)
def test_the_prebuilt_user_serializer_agrees_with_user_schema(
    user_id, text, active, created, last_login, verified, mfa_since, aal
):
    from authapp.auth.context import SessionRow
    from authapp.schemas import UserSchema, user_out

    amr = "pwd otp" if aal == "aal2" else "pwd"
    user = (user_id, text, text + "@example.com", active, created, last_login, verified, mfa_since)
    row = SessionRow(*user, None, created, aal, amr)
    assert user_out(row) == UserSchema().dump(row)


def test_the_prebuilt_user_serializer_has_every_field_of_the_schema(client, tokens):
    from authapp.schemas import UserSchema, user_out

    me = client.get("/auth/me", headers=bearer(tokens["access_token"]))
    assert me.get_json() == tokens["user"]  # the register answer went through UserSchema
    assert list(me.get_json()) == sorted(UserSchema().fields)  # sorted keys, as Flask's JSON writes them
    spec = client.get("/openapi.json").get_json()
    documented = spec["paths"]["/auth/me"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert documented == {"$ref": "#/components/schemas/User"}
    assert set(spec["components"]["schemas"]["User"]["properties"]) == set(user_out.__code__.co_consts[-1])


@settings(max_examples=200, deadline=None)
@given(**_USER_ROW, expires_in=st.integers(min_value=0, max_value=2**31))
def test_the_prebuilt_token_response_serializer_agrees_with_its_schema(
    user_id, text, active, created, last_login, verified, mfa_since, aal, expires_in
):
    from authapp.auth.refresh import _User
    from authapp.schemas import TokenResponseSchema, token_response_out

    user = _User(user_id, text, text + "@example.com", active, created, last_login, verified, mfa_since)
    pair = {"access_token": text + ".a", "refresh_token": text + ".r", "token_type": "bearer"}
    pair.update(expires_in=expires_in, aal=aal, user=user)
    assert token_response_out(pair) == TokenResponseSchema().dump(pair)


def test_the_prebuilt_token_response_serializer_has_every_field_of_the_schema(client, tokens):
    from authapp.schemas import TokenResponseSchema

    refreshed = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200 and refreshed.mimetype == "application/json"
    body = refreshed.get_json()
    assert list(body) == sorted(TokenResponseSchema().fields)  # sorted keys, as Flask's JSON writes them
    assert body["user"] == tokens["user"]  # the register answer went through the schemas
    assert set(body) == set(tokens)
    spec = client.get("/openapi.json").get_json()
    documented = spec["paths"]["/auth/refresh"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert documented == {"$ref": "#/components/schemas/TokenResponse"}


def test_a_body_schema_is_made_once_not_for_each_request(client, tokens, monkeypatch):
    from marshmallow import Schema

    made = []
    init = Schema.__init__
    monkeypatch.setattr(Schema, "__init__", lambda self, *a, **k: made.append(type(self)) or init(self, *a, **k))
    for _ in range(2):
        refreshed = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert refreshed.status_code == 200
        tokens = refreshed.get_json()
    assert made == []


def test_the_liveness_body_is_the_schemas(client):
    from authapp.schemas import LivenessSchema

    body = client.get("/health/live").get_json()
    assert body == LivenessSchema().dump(body) and set(body) == set(LivenessSchema().fields) == {"status", "timestamp"}


OLD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-site",
}


@pytest.mark.parametrize(
    ("method", "path", "docs", "no_store"),
    [
        ("GET", "/health/live", False, False),
        ("GET", "/auth/me", False, True),
        ("POST", "/auth/login", False, True),
        ("GET", "/auth/no-such-route", False, True),
        ("DELETE", "/health/live", False, False),
        ("GET", "/docs", True, False),
        ("GET", "/redoc", True, False),
        ("GET", "/openapi.json", False, False),
        ("GET", "/.well-known/jwks.json", False, False),
    ],
)
def test_every_answer_has_its_security_headers_once(client, method, path, docs, no_store):
    from authapp import security

    response = client.open(path, method=method)
    for name, value in OLD_HEADERS.items():
        assert response.headers.getlist(name) == [value]
    policy = security.DOCS_POLICY if docs else security.API_POLICY
    assert response.headers.getlist("Content-Security-Policy") == [policy]
    if no_store:
        assert response.headers.getlist("Cache-Control") == ["no-store"]
        assert response.headers.getlist("Pragma") == ["no-cache"]
    else:
        assert "Pragma" not in response.headers


# -- hmac_keys --------------------------------------------------------------------------------


def test_hmac_keys_remember_only_what_pyjwt_accepted(app, client, tokens):
    from jwt.algorithms import HMACAlgorithm

    keyring = app.extensions["authapp_keys"]
    (key,) = keyring.current().keys.values()
    assert isinstance(key.verifier.Algorithm, speedups.RememberingHMAC)
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    assert list(key.verifier.Algorithm.accepted) == [key.verifier.key]
    own, fast = HMACAlgorithm(HMACAlgorithm.SHA256), speedups.RememberingHMAC(HMACAlgorithm.SHA256)
    public_pem = b"-----BEGIN PUBLIC KEY-----\n" + (
        b"MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n"
    )
    for candidate in (
        key.verifier.key,
        b"a secret",
        "text secret",
        public_pem,
        b'{"kty": "oct"}',
        b"",
        b"ssh-rsa AAAA",
    ):
        outcomes = []
        for algorithm in (own, fast, fast):  # the second time from what it remembered
            try:
                outcomes.append(("ok", algorithm.prepare_key(candidate)))
            except jwt.InvalidKeyError as exc:
                outcomes.append(("InvalidKeyError", str(exc)))
        assert outcomes[0] == outcomes[1] == outcomes[2], candidate
    assert public_pem not in fast.accepted and b"" not in fast.accepted


def test_hmac_keys_verify_as_pyjwt_does(app, tokens):
    keyring = app.extensions["authapp_keys"]
    (key,) = keyring.current().keys.values()
    own = jwt.PyJWK({"kty": "oct", "k": key.verifier._jwk_data["k"]}, algorithm="HS256")
    token = tokens["access_token"]
    for candidate in (token, token[:-2] + ("AA" if not token.endswith("AA") else "BB")):
        outcomes = []
        for verifier in (own, key.verifier):
            try:
                outcomes.append(jwt.decode(candidate, verifier, algorithms=["HS256"], audience="authapp"))
            except jwt.InvalidTokenError as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes[0] == outcomes[1]


def test_a_new_request_id_is_what_uuid4_writes():
    import uuid

    from authapp.observability.requests import new_request_id

    variant_digits = set()
    for _ in range(2000):
        made = new_request_id()
        parsed = uuid.UUID(made)
        assert str(parsed) == made and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        variant_digits.add(made[19])
    assert variant_digits == set("89ab")  # the variant's two random bits stay random
    assert len({new_request_id() for _ in range(1000)}) == 1000


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
        min_size=1,
        max_size=8,
    ),
    st.integers(min_value=0, max_value=3),
)
def test_iso_now_writes_what_iso_writes_of_the_same_time(times, repeats):
    """The same text as `clock.iso(clock.now())` for each time `now()` gives, the same
    second again (the part kept) or another one (written anew)."""
    from authapp import clock

    with pytest.MonkeyPatch.context() as patch:
        for moment in times:
            moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)  # as now() gives it
            for step in range(repeats + 1):
                current = moment + timedelta(milliseconds=step)
                patch.setattr(clock, "now", lambda current=current: current)
                assert clock.iso_now() == clock.iso(current)


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(
        st.text(max_size=12),
        st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=20),
        max_size=8,
    )
)
@example(body={"\x7f": "\x7f"})
def test_json_response_is_jsonify(body):
    """speedups.json_response answers what flask.jsonify answers: the same JSON, keys in the
    same order, the same status, Content-Type and Content-Length rule, one line end."""
    import json

    from flask import Flask, jsonify

    from authapp.speedups import json_response

    app = Flask(__name__)
    with app.app_context():
        ours, flasks = json_response(body), jsonify(body)
    assert ours.status == flasks.status and ours.mimetype == flasks.mimetype
    assert ours.headers["Content-Type"] == flasks.headers["Content-Type"]
    assert ours.headers["Content-Length"] == str(len(ours.get_data()))
    assert list(json.loads(ours.get_data())) == list(json.loads(flasks.get_data()))
    assert json.loads(ours.get_data()) == json.loads(flasks.get_data())
    assert ours.get_data().endswith(b"\n") and not ours.get_data().endswith(b"\n\n")
    # Byte for byte when every character is printable ASCII: the json module escapes the
    # others (DEL too), orjson writes them as they are (control characters escaped).
    if all(" " <= c <= "~" for c in json.dumps(body, ensure_ascii=False)):
        assert ours.get_data() == flasks.get_data()


# -- documentation_only -------------------------------------------------------------------

_OPENAPI_OF_ANOTHER_SMOREST = """
import sys
from authapp import speedups
speedups._smorest_version = lambda: "0.0"  # as under another release: smorest's wrappers stay
from authapp import create_app
from authapp.auth import routes
app = create_app({"DATABASE_URL": sys.argv[1], "JWT_SECRET_KEY": "k" * 64})
view = lambda: None  # noqa: E731
assert routes.errors(401)(view) is not view  # flask-smorest's own wrappers
sys.stdout.write(app.test_client().get("/openapi.json").get_data(as_text=True))
"""


def test_documentation_only_writes_the_same_openapi_document(tmp_path):
    """The whole document, byte for byte, with flask-smorest's own wrappers (another
    release, in a process of its own: views are decorated at import) and without them."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/docs.db"
    command = [sys.executable, "-c", _OPENAPI_OF_ANOTHER_SMOREST, url]
    theirs = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    ours = create_app(base_settings(DATABASE_URL=url)).test_client().get("/openapi.json").get_data(as_text=True)
    assert '"/auth/me"' in ours and ours == theirs


def test_documentation_only_leaves_no_wrapper_and_the_same_description():
    from authapp.openapi import Blueprint
    from authapp.schemas import UserSchema

    blp = Blueprint("sample", __name__)

    def view():
        return "ok"

    schema = UserSchema()  # one instance for both: a schema is equal only to itself
    documented = blp.written_response(200, schema)(
        blp.alt_response(401, response="UNAUTHORIZED")(blp.doc(security=[{"bearerAuth": []}])(view))
    )
    assert documented is view
    import flask_smorest

    plain = flask_smorest.Blueprint("plain", __name__)

    def other():
        return "ok"

    wrapped = plain.response(200, schema)(
        plain.alt_response(401, response="UNAUTHORIZED")(plain.doc(security=[{"bearerAuth": []}])(other))
    )
    assert wrapped is not other and wrapped._apidoc == view._apidoc


def test_a_written_response_is_what_flask_smorest_passes_through():
    """flask-smorest's `response` returns a view's own `Response` as it is: the answer
    `written_response` leaves to the view alone."""
    import flask_smorest
    from flask import Response

    from authapp.schemas import UserSchema

    app = Flask(__name__)
    written = Response(b'{"a":1}\n', status=200, mimetype="application/json")
    wrapped = flask_smorest.Blueprint("plain", __name__).response(200, UserSchema)(lambda: written)
    with app.test_request_context("/"):
        assert wrapped() is written


# -- verified_tokens ----------------------------------------------------------------------


def test_a_verified_token_is_not_decoded_again_and_its_session_still_is(app, client, tokens, monkeypatch):
    access = bearer(tokens["access_token"])
    decodes = pyjwt_decodes(monkeypatch)
    for _ in range(3):
        assert client.get("/auth/me", headers=access).get_json() == tokens["user"]
    assert decodes == [tokens["access_token"]]  # verified once, by the first request
    assert client.post("/auth/logout", headers=access).status_code == 204
    assert_error(client.get("/auth/me", headers=access), 401, "TOKEN_REVOKED")  # the session: read each time


def test_a_verified_token_is_checked_again_once_expired_or_its_key_changed(app, client, tokens, monkeypatch):
    from authapp.auth import keys

    access = bearer(tokens["access_token"])
    assert client.get("/auth/me", headers=access).status_code == 200
    keyring = app.extensions["authapp_keys"]
    key, exp, claims = keyring.verified[tokens["access_token"]]
    assert claims["sid"] and keyring.still_verifies(key, exp)
    monkeypatch.setattr(keys.time, "time", lambda: exp + 0.5)  # PyJWT's clock is its own: the rule only
    assert not keyring.still_verifies(key, exp)
    monkeypatch.undo()
    other = keys.Key(key.kid, key.algorithm, key.state, key.verifier, key.signer)  # a reloaded set's key
    assert not keyring.still_verifies(other, exp)
    decodes = pyjwt_decodes(monkeypatch)
    keyring.verified[tokens["access_token"]] = (other, exp, claims)
    assert client.get("/auth/me", headers=access).status_code == 200
    assert decodes == [tokens["access_token"]]  # verified again, and remembered with its key
    assert keyring.verified[tokens["access_token"]][0] is key


def test_verified_tokens_are_bounded_and_off_with_the_speedup(app, client, tokens, database_url, monkeypatch):
    from authapp.auth import keys

    keyring = app.extensions["authapp_keys"]
    monkeypatch.setattr(keys, "VERIFIED_TOKENS_KEPT", 2)
    keyring.verified.clear()
    keyring.verified.update({"a": (None, 0, {}), "b": (None, 0, {})})
    assert client.get("/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
    assert list(keyring.verified) == [tokens["access_token"]]
    off = create_app(base_settings(DATABASE_URL=database_url, SPEEDUPS="none"))
    try:
        assert off.extensions["authapp_keys"].verified is None
    finally:
        speedups.install(app, speedups.NAMES)


# -- app_hooks ------------------------------------------------------------------------------


def test_app_hooks_call_the_before_request_hooks_as_flask_does(database_url):
    """App-wide hooks run in order and one that answers ends the request; a blueprint's
    hook (or a URL value preprocessor) hands the request back to Flask's own walk."""
    from flask import Blueprint, request

    for with_blueprint in (False, True):
        app = create_app(base_settings(DATABASE_URL=database_url))
        assert app.extensions["authapp.speedups"]["app_hooks"] and "preprocess_request" in vars(app)
        seen: list[str] = []

        def app_wide(seen=seen):
            seen.append("app")
            return ("stop", 418) if request.path == "/health/live/x" else None

        app.before_request(app_wide)
        if with_blueprint:
            late = Blueprint("late", __name__)
            late.before_request(lambda seen=seen: seen.append("blueprint"))
            late.add_url_rule("/late", view_func=lambda: "late")
            app.register_blueprint(late)
        client = app.test_client()
        assert client.post("/auth/logout-all", data="x", content_type="text/plain").status_code == 415  # check_body
        assert seen == []  # check_body answered first
        assert client.get("/health/live").status_code == 200 and seen == ["app"]
        assert client.get("/health/live/x").status_code == 418
        if with_blueprint:
            seen.clear()
            assert client.get("/late").get_data(as_text=True) == "late" and seen == ["app", "blueprint"]


def test_app_hooks_remove_a_session_the_request_made_and_skip_one_it_did_not(app, client, tokens):
    from authapp.extensions import db

    with app.app_context():
        db.session.execute(text("SELECT 1"))
        assert db.session.registry.has()
    with app.app_context():
        assert not db.session.registry.has()  # removed at the end of the context before
    assert client.get("/health/live").status_code == 200  # none made: nothing to remove
    assert client.post("/auth/logout-all", headers=bearer(tokens["access_token"])).status_code == 204
    with app.app_context():
        assert not db.session.registry.has()
    assert speedups.install(app, speedups.NAMES)["app_hooks"]  # again: still in place, no warning
