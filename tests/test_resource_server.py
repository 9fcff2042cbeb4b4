"""examples/resource-server, a separate process, verifies authapp's access tokens over
HTTP by the key set alone; and a key rotation across two authapp processes reaches both,
and the resource server, without a restart and without logging anyone out."""

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
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from flask import Flask
from helpers import PASSWORD, base_settings, bearer, http, live_server, post_json, wait_until

from authapp import create_app
from authapp.auth import keys
from authapp.extensions import db

ROOT = Path(__file__).resolve().parent.parent
RESOURCE_SERVER = ROOT / "examples" / "resource-server" / "app.py"
# An authapp process: wsgi.py's app (as uWSGI loads it) behind werkzeug's server on a free
# port, which it prints once it listens.
SERVE_AUTHAPP = (
    "from werkzeug.serving import make_server; from wsgi import app; "
    "server = make_server('127.0.0.1', 0, app, threaded=True); "
    "print(f'listening on http://127.0.0.1:{server.server_port}', flush=True); server.serve_forever()"
)
STARTUP_SECONDS = 60


class Servers:
    """authapp instances on the test's database (in this process, or processes of their
    own) and resource servers (processes); every one stopped at the end of the test."""

    def __init__(self, stack: ExitStack, database_url: str, logs: Path) -> None:
        self.stack, self.database_url, self.logs = stack, database_url, logs
        self.apps: list[Flask] = []

    def operator(self, **settings: object) -> Flask:
        """An app on the test's database that serves nothing: where the operator's
        `flask keys` commands run."""
        app = create_app(base_settings(DATABASE_URL=self.database_url, **settings))
        self.apps.append(app)
        return app

    def authapp(self, **settings: object) -> tuple[Flask, str]:
        """An instance in this process (a live server, a thread per request)."""
        app = self.operator(**settings)
        return app, self.stack.enter_context(live_server(app))

    def authapp_processes(self, count: int, **settings: object) -> list[str]:
        """`count` instances, each a process of its own serving wsgi.py's app."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "JWT_", "DATABASE_URL"))}
        env.update(base_settings(DATABASE_URL=self.database_url, **settings), PYTHONPATH=str(ROOT))
        started = [self._start(f"authapp-{n}", [sys.executable, "-c", SERVE_AUTHAPP], env) for n in range(count)]
        return [listening() for listening in started]

    def resource_server(self, jwks_url: str, algorithms: str, *, cache_seconds: float = 300) -> str:
        env = {
            **os.environ,
            "AUTHAPP_JWKS_URL": jwks_url,
            "AUTHAPP_ALGORITHMS": algorithms,
            "JWKS_CACHE_SECONDS": str(cache_seconds),
            "JWKS_UNKNOWN_KID_COOLDOWN": "0",
        }
        return self._start("resource-server", [sys.executable, str(RESOURCE_SERVER), "--port", "0"], env)()

    def _start(self, name: str, command: list[str], env: dict[str, str]):
        """Start a server process; returns the wait for its "listening on URL" line (the URL)."""
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)

        def stop() -> None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            process.stdout.close()
            log.close()

        self.stack.callback(stop)

        def listening() -> str:
            ready, _, _ = select.select([process.stdout], [], [], STARTUP_SECONDS)
            line = process.stdout.readline() if ready else ""
            assert line.startswith("listening on "), f"{name} did not start ({line!r}); its log: {log.name}"
            return line.split()[-1]

        return listening


@pytest.fixture
def servers(database_url, tmp_path):
    with ExitStack() as stack:
        started = Servers(stack, database_url, tmp_path)
        yield started
    for app in started.apps:
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


def with_the_active_key(app: Flask) -> tuple[str, Callable[..., str]]:
    """authapp's active key (read from its key ring): its kid, and a signer of tokens with
    it, its kid and `typ: at+jwt` unless `header` says otherwise. What the signer makes
    carries authapp's own signature, so whatever the resource server refuses of it, it
    refuses for the claims or header given."""
    with app.app_context():
        signing = keys.signing_key()

    def sign(claims: dict, **header: str) -> str:
        return jwt.encode(
            claims, signing.signer, algorithm=signing.algorithm, headers={"kid": signing.kid, "typ": "at+jwt", **header}
        )

    return signing.kid, sign


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
def test_the_resource_server_verifies_tokens_by_the_key_set_alone(servers, algorithm):
    app, base = servers.authapp(JWT_ALGORITHM=algorithm)
    with app.app_context():
        keys.generate(activate=True)
    resource = servers.resource_server(f"{base}/.well-known/jwks.json", algorithm)
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
        "another key under authapp's kid": jwt.encode(
            claims, keys.new_private_key(algorithm), algorithm=algorithm, headers={"kid": jwk["kid"], "typ": "at+jwt"}
        ),
    }
    for what, token in refused.items():
        headers = bearer(token) if token else {}
        status, _, body = http("GET", f"{resource}/api/whoami", headers=headers)
        assert status == 401, (what, body)
        assert body["error_code"] == "INVALID_TOKEN", what

    # Tokens signed by authapp's own active key, each with one claim or header changed:
    # the control (the same signer, the token's own claims) is accepted, so each refusal
    # below is the resource server's check of what was changed, not of the signature.
    kid, sign = with_the_active_key(app)
    assert kid == jwk["kid"] == kid_of(tokens["access_token"])
    now = int(time.time())
    status, body = whoami(resource, sign(claims))
    assert status == 200 and body["user_id"] == claims["sub"], body
    signed_by_authapp = {
        "wrong aud": (sign({**claims, "aud": "another-api"}), "Invalid token"),
        "wrong iss": (sign({**claims, "iss": "https://another-issuer.example"}), "Invalid token"),
        "expired": (sign({**claims, "iat": now - 3600, "nbf": now - 3600, "exp": now - 60}), "Token has expired"),
        "type refresh": (sign({**claims, "type": "refresh"}), "Not an access token"),
        "typ JWT": (sign(claims, typ="JWT"), "Not an access token"),
    }
    for what, (token, detail) in signed_by_authapp.items():
        status, body = whoami(resource, token)
        assert (status, body.get("error_code"), body.get("detail")) == (401, "INVALID_TOKEN", detail), (what, body)


# What the rotation's instances are given: keys read again every second (60 by default).
RELOAD_SECONDS = 1


def test_a_rotation_reaches_two_instances_and_the_resource_server(servers):
    """Two authapp processes (wsgi.py's app, each with its own key set in memory, as each
    uWSGI worker has) sharing one database, reloading keys every second; the `keys`
    commands run from a third app on that database, as an operator's `flask keys` does;
    and a resource server whose key-set cache lasts a second (300 by default)."""
    operator = servers.operator(JWT_ALGORITHM="EdDSA")
    with operator.app_context():
        first = keys.generate(activate=True)
    base_one, base_two = servers.authapp_processes(2, JWT_ALGORITHM="EdDSA", JWT_KEYS_RELOAD_SECONDS=RELOAD_SECONDS)
    resource = servers.resource_server(f"{base_one}/.well-known/jwks.json", "EdDSA", cache_seconds=1)
    register(base_one, "alice")
    old = login(base_two, "alice")
    assert kid_of(old["access_token"]) == first.kid
    assert me(base_one, old["access_token"])[0] == 200
    assert whoami(resource, old["access_token"])[0] == 200

    # A standby key is published by both processes, but neither signs with it.
    with operator.app_context():
        second = keys.generate()
    wait_until(lambda: second.kid in published(base_one) and second.kid in published(base_two), 10, "publication")
    for base in (base_one, base_two):
        assert kid_of(login(base, "alice")["access_token"]) == first.kid

    # Activated: both processes sign with it once their key set is older than the reload
    # interval (1 s here; the 10 s allowed are for a loaded machine, far inside the 60 s
    # documented with the default).
    with operator.app_context():
        keys.activate_key(second.kid)
    started = time.monotonic()
    for base in (base_one, base_two):
        wait_until(lambda base=base: kid_of(login(base, "alice")["access_token"]) == second.kid, 10, f"{base} signs")
    assert time.monotonic() - started < 60
    new = login(base_one, "alice")
    for base in (base_one, base_two):
        assert kid_of(login(base, "alice")["access_token"]) == second.kid  # and keeps signing with it
        assert me(base, new["access_token"])[0] == 200
    assert whoami(resource, new["access_token"])[0] == 200

    # The previous key's token keeps working everywhere until that key is retired.
    for base in (base_one, base_two):
        assert me(base, old["access_token"])[0] == 200
    assert whoami(resource, old["access_token"])[0] == 200
    status, body = post_json(f"{base_two}/auth/refresh", {"refresh_token": old["refresh_token"]})
    assert status == 200 and kid_of(body["access_token"]) == second.kid

    with operator.app_context():
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
