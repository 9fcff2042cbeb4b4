"""examples/resource-server, a separate process, verifies authapp's access tokens over
HTTP by the key set alone; and a key rotation across two running instances of authapp
reaches both, and the resource server, without a restart and without logging anyone out."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import select
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from helpers import PASSWORD, base_settings, bearer, http, live_server, post_json, wait_until

from authapp import create_app
from authapp.auth import keys
from authapp.extensions import db

ROOT = Path(__file__).resolve().parent.parent
RESOURCE_SERVER = ROOT / "examples" / "resource-server" / "app.py"


@pytest.fixture
def servers(database_url):
    """Start authapp instances (live servers on the test's database) and resource servers
    (subprocesses); all stopped at the end."""
    stack = ExitStack()
    apps = []

    def authapp(**settings):
        app = create_app(base_settings(DATABASE_URL=database_url, **settings))
        apps.append(app)
        return app, stack.enter_context(live_server(app))

    def resource_server(jwks_url: str, algorithms: str, *, cache_seconds: float = 300) -> str:
        env = {
            **os.environ,
            "AUTHAPP_JWKS_URL": jwks_url,
            "AUTHAPP_ALGORITHMS": algorithms,
            "JWKS_CACHE_SECONDS": str(cache_seconds),
            "JWKS_UNKNOWN_KID_COOLDOWN": "0",
        }
        process = subprocess.Popen(
            [sys.executable, str(RESOURCE_SERVER), "--port", "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

        def stop() -> None:
            process.terminate()
            process.wait(timeout=10)
            process.stdout.close()

        stack.callback(stop)
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("listening on "), f"the resource server did not start: {line!r}"
        return line.split()[-1]

    with stack:
        yield authapp, resource_server
    for app in apps:
        with app.app_context():
            db.engine.dispose()


def register(base: str, name: str) -> dict:
    status, body = post_json(
        f"{base}/auth/register", {"email": f"{name}@example.com", "username": name, "password": PASSWORD}
    )
    assert status == 201, body
    return body


def login(base: str, name: str) -> dict:
    status, body = post_json(f"{base}/auth/login", {"username": name, "password": PASSWORD})
    assert status == 200, body
    return body


def me(base: str, token: str) -> tuple[int, dict]:
    status, _, body = http("GET", f"{base}/auth/me", headers=bearer(token))
    return status, body


def whoami(resource: str, token: str) -> tuple[int, dict]:
    status, _, body = http("GET", f"{resource}/api/whoami", headers=bearer(token))
    return status, body


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def published(base: str) -> set[str]:
    return {key["kid"] for key in http("GET", f"{base}/.well-known/jwks.json")[2]["keys"]}


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
def test_the_resource_server_verifies_tokens_by_the_key_set_alone(servers, algorithm):
    start_authapp, start_resource_server = servers
    app, base = start_authapp(JWT_ALGORITHM=algorithm)
    with app.app_context():
        keys.generate(activate=True)
    resource = start_resource_server(f"{base}/.well-known/jwks.json", algorithm)
    tokens = register(base, "alice")

    status, body = whoami(resource, tokens["access_token"])
    assert status == 200, body
    assert body == {
        "user_id": str(tokens["user"]["id"]),
        "session_id": jwt.decode(tokens["access_token"], options={"verify_signature": False})["sid"],
        "aal": "aal1",
    }

    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    jwk = next(iter(http("GET", f"{base}/.well-known/jwks.json")[2]["keys"]))
    public_pem = jwt.PyJWK(jwk).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def hs256_with_public_key() -> str:
        def part(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = part(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": jwk["kid"]}).encode())
        payload = part(json.dumps(claims).encode())
        signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{part(signature)}"

    refused = {
        "no token": None,
        "refresh token": tokens["refresh_token"],
        "tampered": tokens["access_token"][:-4] + ("AAAA" if not tokens["access_token"].endswith("AAAA") else "BBBB"),
        "alg none": jwt.encode(claims, None, algorithm="none", headers={"kid": jwk["kid"], "typ": "at+jwt"}),
        "key confusion": hs256_with_public_key(),
        "wrong audience": jwt.encode(
            {**claims, "aud": "another-api"},
            keys.new_private_key(algorithm),
            algorithm=algorithm,
            headers={"kid": jwk["kid"], "typ": "at+jwt"},
        ),
    }
    for what, token in refused.items():
        headers = bearer(token) if token else {}
        status, _, body = http("GET", f"{resource}/api/whoami", headers=headers)
        assert status == 401, (what, body)
        assert body["error_code"] == "INVALID_TOKEN", what


def test_a_rotation_reaches_two_instances_and_the_resource_server(servers):
    """Two authapp instances sharing one database, reloading keys every second (60 by
    default), and a resource server whose key-set cache lasts a second (300 by default)."""
    start_authapp, start_resource_server = servers
    one, base_one = start_authapp(JWT_ALGORITHM="EdDSA", JWT_KEYS_RELOAD_SECONDS=1)
    two, base_two = start_authapp(JWT_ALGORITHM="EdDSA", JWT_KEYS_RELOAD_SECONDS=1)
    with one.app_context():
        first = keys.generate(activate=True)
    resource = start_resource_server(f"{base_one}/.well-known/jwks.json", "EdDSA", cache_seconds=1)
    register(base_one, "alice")
    old = login(base_two, "alice")
    assert kid_of(old["access_token"]) == first.kid
    assert me(base_one, old["access_token"])[0] == 200
    assert whoami(resource, old["access_token"])[0] == 200

    # A standby key is published by both instances, but neither signs with it.
    with one.app_context():
        second = keys.generate()
    wait_until(lambda: second.kid in published(base_one) and second.kid in published(base_two), 10, "publication")
    for base in (base_one, base_two):
        assert kid_of(login(base, "alice")["access_token"]) == first.kid

    # Activated (here through instance two's database session): both sign with it within
    # the reload interval, far inside the documented 60 s.
    with two.app_context():
        keys.activate_key(second.kid)
    started = time.monotonic()
    for base in (base_one, base_two):
        wait_until(lambda base=base: kid_of(login(base, "alice")["access_token"]) == second.kid, 10, f"{base} signs")
    assert time.monotonic() - started < 60
    new = login(base_one, "alice")
    for base in (base_one, base_two):
        assert me(base, new["access_token"])[0] == 200
    assert whoami(resource, new["access_token"])[0] == 200

    # The previous key's token keeps working everywhere until that key is retired.
    for base in (base_one, base_two):
        assert me(base, old["access_token"])[0] == 200
    assert whoami(resource, old["access_token"])[0] == 200
    status, body = post_json(f"{base_two}/auth/refresh", {"refresh_token": old["refresh_token"]})
    assert status == 200 and kid_of(body["access_token"]) == second.kid

    with one.app_context():
        keys.retire_key(first.kid, force=True)
    another = login(base_one, "alice")
    for base in (base_one, base_two):
        wait_until(
            lambda base=base: (
                me(base, another["access_token"])[0] == 200
                and me(base, old["access_token"])[1].get("error_code") == "INVALID_TOKEN"
            ),
            10,
            f"{base} refuses the retired key",
        )
    wait_until(lambda: whoami(resource, old["access_token"])[0] == 401, 10, "the resource server refuses it")
    assert whoami(resource, new["access_token"])[0] == 200
    assert published(base_one) == published(base_two) == {second.kid}
