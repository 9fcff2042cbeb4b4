"""What verifying one authapp access token costs a resource server, per algorithm.

The path of examples/resource-server/app.py without the HTTP: the unverified header's
`typ` and `alg`, the key by `kid` from PyJWKClient's cached key set (no fetch), then
`jwt.decode` with the algorithm allow-list, `iss`, `aud` and the required claims.

    .venv/bin/python bench/verify_tokens.py [--number 2000] [--repeat 7]

Prints the median and the best of `--repeat` runs of `--number` verifications, in
microseconds per token. Single-threaded: one core's work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from pathlib import Path

import jwt
from jwt.api_jwk import PyJWKSet

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from authapp.auth import keys  # noqa: E402

REQUIRED = ["sub", "exp", "iat", "nbf", "iss", "aud", "jti"]
SECRET = "v" * 64


def token_and_client(algorithm: str) -> tuple[str, jwt.PyJWKClient | None, object]:
    now = int(time.time())
    claims = {"sub": "1", "sid": "s" * 36, "iat": now, "nbf": now, "exp": now + 1800, "jti": "j" * 32}
    claims |= {"iss": "authapp", "aud": "authapp", "type": "access", "aal": "aal1", "amr": ["pwd"]}
    if algorithm.startswith("HS"):  # what a holder of the secret does: no key set
        return jwt.encode(claims, SECRET, algorithm=algorithm, headers={"typ": "at+jwt"}), None, SECRET
    private = keys.new_private_key(algorithm)
    jwk = keys.public_jwk(private, algorithm)
    token = jwt.encode(claims, private, algorithm=algorithm, headers={"kid": jwk["kid"], "typ": "at+jwt"})
    client = jwt.PyJWKClient("http://127.0.0.1:9/.well-known/jwks.json", lifespan=3600)
    client.jwk_set_cache.put(PyJWKSet.from_dict({"keys": [jwk]}))  # as after its first fetch
    return token, client, None


def verifier(algorithm: str):
    token, client, secret = token_and_client(algorithm)

    def verify() -> None:
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "at+jwt" and header["alg"] == algorithm
        key = client.get_signing_key_from_jwt(token) if client else secret
        jwt.decode(
            token, key, algorithms=[algorithm], issuer="authapp", audience="authapp", options={"require": REQUIRED}
        )

    verify()
    return verify


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("algorithms", nargs="*", default=["HS256", "EdDSA", "ES256", "RS256"])
    args = parser.parse_args()
    print(f"{'algorithm':<10} {'median us/token':>16} {'best us/token':>14}")
    for algorithm in args.algorithms:
        runs = timeit.repeat(verifier(algorithm), number=args.number, repeat=args.repeat)
        per = [run / args.number * 1e6 for run in runs]
        print(f"{algorithm:<10} {statistics.median(per):>16.1f} {min(per):>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
