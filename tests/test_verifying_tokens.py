"""docs/deployment.md, "How your own backend checks an authapp token": its PyJWT code,
run as written, accepts authapp's access tokens and refuses everything else."""

from __future__ import annotations

import re
import time
from pathlib import Path

import jwt
import pytest
from helpers import SECRET

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


@pytest.fixture(scope="module")
def verify():
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["verify_access_token"]


def test_accepts_an_access_token(verify, tokens):
    claims = verify(tokens["access_token"], [SECRET])
    assert claims["sub"] == str(tokens["user"]["id"]) and claims["type"] == "access"


def test_accepts_a_token_of_the_previous_secret_during_a_rotation(verify, tokens):
    assert verify(tokens["access_token"], ["a-new-secret-" + "n" * 40, SECRET])["type"] == "access"


def test_refuses_a_refresh_token(verify, tokens):
    with pytest.raises(jwt.InvalidTokenError, match="not an access token"):
        verify(tokens["refresh_token"], [SECRET])


def test_refuses_another_secret(verify, tokens):
    with pytest.raises(jwt.InvalidSignatureError):
        verify(tokens["access_token"], ["another-secret-" + "x" * 40])


def forged(claims: dict, key: str = SECRET, algorithm: str = "HS256", typ: str = "at+jwt", **changes) -> str:
    return jwt.encode({**claims, **changes}, key, algorithm=algorithm, headers={"typ": typ})


def test_refuses_expired_wrong_audience_issuer_algorithm_and_missing_claims(verify, tokens):
    claims = jwt.decode(tokens["access_token"], SECRET, algorithms=["HS256"], audience="authapp")
    assert verify(forged(claims), [SECRET])  # the forgery helper itself is sound
    with pytest.raises(jwt.InvalidTokenError, match="not an access token"):
        verify(forged(claims, typ="JWT"), [SECRET])  # the access claims under a refresh token's typ
    now = int(time.time())
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(forged(claims, exp=now - 60), [SECRET])
    with pytest.raises(jwt.InvalidAudienceError):
        verify(forged(claims, aud="another-service"), [SECRET])
    with pytest.raises(jwt.InvalidIssuerError):
        verify(forged(claims, iss="someone-else"), [SECRET])
    with pytest.raises(jwt.InvalidAlgorithmError):
        verify(forged(claims, algorithm="HS512"), [SECRET])
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(jwt.InvalidTokenError):
        verify(unsigned, [SECRET])
    without_exp = {k: v for k, v in claims.items() if k != "exp"}
    with pytest.raises(jwt.MissingRequiredClaimError):
        verify(forged(without_exp), [SECRET])
