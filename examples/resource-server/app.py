"""A resource server: an API of its own that accepts authapp access tokens by the key set
alone (no secret, no call to authapp per request).

    AUTHAPP_JWKS_URL=https://auth.example.com/.well-known/jwks.json \
    AUTHAPP_ISSUER=authapp AUTHAPP_AUDIENCE=authapp AUTHAPP_ALGORITHMS=EdDSA \
    python app.py --port 8081

It checks what RFC 9068 asks of an access token: the signature by a published key, the
algorithm against an allow-list (never the token's own say), `typ: at+jwt`, `exp`, `nbf`,
`iss` and `aud`. It cannot see a logout: a token stays valid here until its `exp` (at most
ACCESS_TOKEN_EXPIRE_MINUTES); call authapp's GET /auth/me where that matters.
"""

from __future__ import annotations

import argparse
import os
import sys

import jwt
from flask import Flask, g, jsonify, request
from werkzeug.serving import make_server

REQUIRED_CLAIMS = ["sub", "exp", "iat", "nbf", "iss", "aud", "jti"]


def create_app(
    jwks_url: str,
    *,
    issuer: str = "authapp",
    audience: str = "authapp",
    algorithms: tuple[str, ...] = ("EdDSA",),
    cache_seconds: float = 300,
    unknown_kid_cooldown: float = 30,
) -> Flask:
    app = Flask(__name__)
    # One client per process. cache_jwk_set (the default) keeps the key set for
    # `cache_seconds` and fetches it again, at most once per `unknown_kid_cooldown`, when a
    # token names an unknown kid. Not cache_keys=True: its per-kid cache never expires, so
    # a retired key would stay accepted until the process restarts.
    keys = jwt.PyJWKClient(jwks_url, lifespan=cache_seconds, cooldown_duration=unknown_kid_cooldown, timeout=5)

    def refuse(detail: str, status: int = 401):
        response = jsonify({"detail": detail, "error_code": "INVALID_TOKEN"})
        response.status_code = status
        response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return response

    @app.before_request
    def authenticate():
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return refuse("Missing bearer token")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("typ") != "at+jwt":  # an authapp refresh token, or any other JWT
                return refuse("Not an access token")
            if header.get("alg") not in algorithms:
                return refuse("Algorithm not allowed")
            key = keys.get_signing_key_from_jwt(token)  # by kid, from the published set only
            g.claims = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                issuer=issuer,
                audience=audience,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            return refuse("Token has expired")
        except jwt.PyJWKClientConnectionError:
            return refuse("The key set cannot be fetched", 503)
        except jwt.PyJWTError:  # bad signature, unknown kid, wrong iss/aud, malformed...
            return refuse("Invalid token")
        if g.claims.get("type") != "access":
            return refuse("Not an access token")
        return None

    @app.get("/api/whoami")
    def whoami():
        return {"user_id": g.claims["sub"], "session_id": g.claims.get("sid"), "aal": g.claims.get("aal")}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0: any free port (printed on start)")
    args = parser.parse_args(argv)
    app = create_app(
        os.environ["AUTHAPP_JWKS_URL"],
        issuer=os.environ.get("AUTHAPP_ISSUER", "authapp"),
        audience=os.environ.get("AUTHAPP_AUDIENCE", "authapp"),
        algorithms=tuple(a.strip() for a in os.environ.get("AUTHAPP_ALGORITHMS", "EdDSA").split(",") if a.strip()),
        cache_seconds=float(os.environ.get("JWKS_CACHE_SECONDS", "300")),
        unknown_kid_cooldown=float(os.environ.get("JWKS_UNKNOWN_KID_COOLDOWN", "30")),
    )
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
