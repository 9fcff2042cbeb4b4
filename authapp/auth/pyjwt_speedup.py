"""PyJWT's check of a token segment's alphabet, at C speed.

PyJWT 2.15 refuses a segment holding a byte outside the base64url alphabet
(GHSA-hxm8-2xgr-2p9m) by testing each byte in a Python generator. flask-jwt-extended
reads every access token twice and its header twice, so on a protected request that
check alone cost more than the token's HMAC and claims together (measured with cProfile:
2.9 million generator steps for 2,000 GET /auth/me). Here the same check is one
`bytes.translate` call, which deletes the alphabet's bytes and leaves whatever else the
segment holds; the rest of PyJWT's function is unchanged. tests/test_tokens.py checks that
this function and PyJWT's own agree on every kind of segment, and that it is installed.

It is installed only over the PyJWT release it was written from (requirements.txt pins
it); any other release keeps its own function, and nothing here reaches into PyJWT's
private names until `install()` has checked the release.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable

import jwt
from jwt.exceptions import DecodeError
from jwt.utils import base64url_decode, base64url_encode

WRITTEN_FOR = "2.15.1"
# PyJWT 2.15.1's jwt.api_jws._BASE64URL_ALPHABET (tests/test_tokens.py compares them).
BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# PyJWT's own function, once `install()` has replaced it.
original: Callable[[bytes, str], bytes] | None = None


def decode_base64url_segment(segment: bytes, name: str) -> bytes:
    """PyJWS._decode_base64url_segment of PyJWT 2.15.1, with its alphabet test in C."""
    # Accept trailing '=' used by some issuers (e.g. AWS ALB). Still
    # reject non-alphabet junk such as '!!!!' (GHSA-hxm8-2xgr-2p9m).
    padding = 0
    stripped = segment
    while stripped.endswith(b"="):
        stripped = stripped[:-1]
        padding += 1
        if padding > 2:
            raise DecodeError(f"Invalid {name} padding")

    if padding and len(segment) % 4 != 0:
        raise DecodeError(f"Invalid {name} padding")

    if len(stripped) % 4 == 1 or stripped.translate(None, BASE64URL_ALPHABET):
        raise DecodeError(f"Invalid {name} padding")

    try:
        decoded = base64url_decode(stripped)
    except (TypeError, binascii.Error) as err:
        raise DecodeError(f"Invalid {name} padding") from err

    if base64url_encode(decoded) != stripped:
        raise DecodeError(f"Invalid {name} padding")

    return decoded


def install() -> bool:
    """Put the C-speed check in PyJWT's place; True when it is there."""
    global original
    if jwt.__version__ != WRITTEN_FOR:
        return False
    try:
        from jwt.api_jws import PyJWS

        current = PyJWS.__dict__["_decode_base64url_segment"].__func__
    except (ImportError, KeyError, AttributeError):
        return False
    if current is not decode_base64url_segment:
        original = current
    PyJWS._decode_base64url_segment = staticmethod(decode_base64url_segment)
    return True
