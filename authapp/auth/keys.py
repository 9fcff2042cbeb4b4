"""Signing keys: which key signs a token, which keys verify one, and the published key set.

With HS256/384/512 the keys come from the configuration: `JWT_SECRET_KEY` signs and
verifies, each of `JWT_PREVIOUS_SECRET_KEYS` still verifies. With RS256, ES256 or EdDSA
they are rows of `signing_keys` (standby: published and verifying; active: also signing,
exactly one; retired: neither), their private parts sealed with AES-256-GCM under a key
that HKDF derives from `JWT_SECRET_KEY`. Every key's `kid` is its RFC 7638 thumbprint.

Each process keeps one immutable `KeySet` per app and re-reads the table at most every
`JWT_KEYS_RELOAD_SECONDS` (60), and at once when a token names a `kid` it does not know
(at most once per `UNKNOWN_KID_RELOAD_SECONDS`), so a rotation reaches every instance
without a restart and a flood of made-up kids costs one query per few seconds.

An access token (every protected request) is verified by `decode_access_token`, a refresh
token (every refresh) by `decode_refresh_token`: one PyJWT decode with the key its `kid`
names, bound to the configured algorithm (a PyJWK), then the token's shape (header
parameters, `typ`, `type`, claims, `sub`). flask-jwt-extended's own verification (three
decodes of the token) keeps `decode_key` as its key loader, which checks the same shape.
Signing is `sign`: what PyJWT's `jwt.encode` makes with the active key, its header and
prepared key made once per key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, NoReturn, cast

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Flask, current_app
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms
from jwt.utils import base64url_decode, base64url_encode
from jwt.warnings import InsecureKeyLengthWarning
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from config import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, ConfigError

from .. import audit, clock, settings
from ..database import unit_of_work
from ..errors import AppError, NotFound, ServiceUnavailable
from ..models import SigningKey

log = logging.getLogger("authapp.keys")

STANDBY, ACTIVE, RETIRED = "standby", "active", "retired"
ACCESS_TYP = "at+jwt"  # RFC 9068
REFRESH_TYP = "JWT"
# The key set's Cache-Control max-age: how long a verifier may keep it.
JWKS_MAX_AGE = 300
UNKNOWN_KID_RELOAD_SECONDS = 5
RSA_BITS = 3072

# The only JOSE header parameters a token of ours carries; anything else (jwk, jku, x5u,
# x5c, crit, ...) is refused before any key is looked up.
ALLOWED_HEADER = frozenset({"alg", "typ", "kid"})
COMMON_CLAIMS = ("sub", "sid", "exp", "iat", "nbf", "jti", "iss", "aud", "type")
ACCESS_CLAIMS = (*COMMON_CLAIMS, "aal", "amr")
REFRESH_CLAIMS = COMMON_CLAIMS
_REQUIRED = {"access": (ACCESS_TYP, frozenset(ACCESS_CLAIMS)), "refresh": (REFRESH_TYP, frozenset(REFRESH_CLAIMS))}
_USER_ID = re.compile(r"[1-9][0-9]{0,17}")

# RFC 7638 3.2: the members of each key type that its thumbprint hashes.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}
_SEAL_VERSION = b"\x01"
_SEAL_INFO = b"authapp: signing keys at rest, AES-256-GCM"

# Audit events of the operator commands.
KEY_GENERATED = "signing_key_generated"
KEY_ACTIVATED = "signing_key_activated"
KEY_RETIRED = "signing_key_retired"


class KeyStateError(AppError):
    """An operator command that cannot do what it was asked (the message says why)."""

    status, code, detail = 409, "KEY_STATE", "The key cannot change to that state"


class NoSigningKey(ServiceUnavailable):
    detail = "No active signing key: run `flask --app wsgi keys generate --activate`"


# -- Keys as JWKs -------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a JWK, base64url without padding."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def hmac_kid(secret: str) -> str:
    """An HS* secret's kid: the thumbprint of its `oct` JWK, a hash that never shows the secret."""
    return thumbprint({"kty": "oct", "k": b64url(secret.encode())})


def new_private_key(algorithm: str) -> Any:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"no key pair for {algorithm}")


def public_jwk(private_key: Any, algorithm: str) -> dict[str, Any]:
    """The public JWK of a private key: the thumbprint's members plus kid, alg and use."""
    full = get_default_algorithms()[algorithm].to_jwk(private_key.public_key(), as_dict=True)
    jwk = {name: full[name] for name in _THUMBPRINT_MEMBERS[full["kty"]]}
    return {**jwk, "kid": thumbprint(jwk), "alg": algorithm, "use": "sig"}


# -- Private parts at rest ----------------------------------------------------------------


def _sealing_keys(config: dict[str, Any]) -> list[AESGCM]:
    """AES-256-GCM keys from JWT_SECRET_KEY, then from each previous secret."""
    secrets_ = [config["JWT_SECRET_KEY"], *config.get("JWT_PREVIOUS_SECRET_KEYS", [])]
    return [AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=_SEAL_INFO).derive(s.encode())) for s in secrets_]


def _associated_data(kid: str, algorithm: str) -> bytes:
    # Binds a sealed key to its row: a ciphertext copied to another row does not open.
    return f"authapp signing key {kid} {algorithm}".encode()


def seal_bytes(plain: bytes, associated_data: bytes, config: dict[str, Any]) -> bytes:
    """`plain` encrypted with AES-256-GCM under the key derived from JWT_SECRET_KEY, bound to
    `associated_data` (what the ciphertext belongs to): signing keys and TOTP secrets at rest."""
    nonce = os.urandom(12)
    return _SEAL_VERSION + nonce + _sealing_keys(config)[0].encrypt(nonce, plain, associated_data)


def open_sealed(sealed: bytes, associated_data: bytes, config: dict[str, Any]) -> bytes | None:
    """What `seal_bytes` sealed, opened with the current or a previous secret; None when
    none of them opens it (or the format is unknown)."""
    return reopen(sealed, associated_data, config)[0]


def reopen(sealed: bytes, associated_data: bytes, config: dict[str, Any]) -> tuple[bytes | None, bytes | None]:
    """(what `seal_bytes` sealed, or None when no configured secret opens it; the same
    sealed again under JWT_SECRET_KEY when a previous secret opened it, else None): a
    value re-sealed this way no longer needs the previous secret."""
    if not sealed.startswith(_SEAL_VERSION):
        return None, None
    nonce, ciphertext = sealed[1:13], sealed[13:]
    for index, aead in enumerate(_sealing_keys(config)):
        try:
            plain = aead.decrypt(nonce, ciphertext, associated_data)
        except InvalidTag:
            continue
        return plain, (seal_bytes(plain, associated_data, config) if index else None)
    return None, None


@dataclass
class Resealed:
    """What a re-seal did: how many values it sealed again under JWT_SECRET_KEY, how many
    were under it already, and which (row names, never the values) no secret opens."""

    resealed: int = 0
    current: int = 0
    unopenable: list[str] = field(default_factory=list)

    def count(self, name: str, plain: bytes | None, fresh: bytes | None, written: bool) -> None:
        if plain is None:
            self.unopenable.append(name)
        elif fresh is None:
            self.current += 1
        elif written:
            self.resealed += 1


def replace_sealed(column: Any, sealed: bytes, fresh: bytes, *where: Any) -> bool:
    """Store `fresh` (a value sealed again) in `column` of the row `where` names, only if the
    row still holds `sealed` (a change meanwhile wins); True when it was written."""
    with unit_of_work() as db:
        statement = update(column.class_).where(*where, column == sealed).values({column: fresh})
        return db.execute(statement).rowcount == 1  # type: ignore[attr-defined]


def reseal_signing_keys(config: dict[str, Any]) -> Resealed:
    """Seal every stored private key again under JWT_SECRET_KEY (`flask keys reseal`); a
    row changed meanwhile (retired, or re-sealed by another run) is left as it is."""
    result = Resealed()
    with unit_of_work() as db:
        rows = db.execute(
            select(SigningKey.kid, SigningKey.algorithm, SigningKey.private_key_sealed).where(
                SigningKey.private_key_sealed.is_not(None)
            )
        ).all()
    for kid, algorithm, sealed in rows:
        plain, fresh = reopen(cast(bytes, sealed), _associated_data(kid, algorithm), config)
        written = fresh is not None and replace_sealed(
            SigningKey.private_key_sealed, cast(bytes, sealed), fresh, SigningKey.kid == kid
        )
        result.count(f"signing key {kid}", plain, fresh, written)
    return result


def seal(private_key: Any, kid: str, algorithm: str, config: dict[str, Any]) -> bytes:
    der = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return seal_bytes(der, _associated_data(kid, algorithm), config)


class UnsealableKey(ServiceUnavailable):
    """The active key's private part cannot be opened with the configured secrets: a
    client gets 503 SERVICE_UNAVAILABLE, the log and a production start say why."""

    detail = "No token can be signed right now"

    def __init__(self, reason: str) -> None:
        super().__init__(headers={"Retry-After": "60"})
        self.reason = reason


def unseal(sealed: bytes, kid: str, algorithm: str, config: dict[str, Any]) -> Any:
    """The private key of a sealed row, opened with the current or a previous secret."""
    if not sealed.startswith(_SEAL_VERSION):
        raise UnsealableKey(f"signing key {kid} is stored in an unknown sealed-key format")
    der = open_sealed(sealed, _associated_data(kid, algorithm), config)
    if der is not None:
        return serialization.load_der_private_key(der, password=None)
    log.error(
        "signing key %s cannot be opened: it was sealed with a secret that is neither JWT_SECRET_KEY "
        "nor in JWT_PREVIOUS_SECRET_KEYS",
        kid,
        extra={"event": "signing_key_unsealable", "kid": kid},
    )
    raise UnsealableKey(
        f"signing key {kid} was sealed with a secret that is neither JWT_SECRET_KEY nor in JWT_PREVIOUS_SECRET_KEYS"
    )


# -- The key set of one process -----------------------------------------------------------


@dataclass(frozen=True)
class Key:
    kid: str
    algorithm: str
    state: str
    verifier: PyJWK
    signer: Any = None  # the private key (or HMAC secret) of the signing key only
    jwk: dict[str, Any] | None = None  # published (asymmetric keys only)

    @cached_property
    def signing_parts(self) -> tuple[Any, Any, dict[bool, bytes]]:
        """What `sign` needs of this key, made at its first signature instead of at each:
        PyJWT's algorithm, the key as PyJWT prepares it (for an HMAC secret: a PEM pattern,
        two DER parses and a JSON parse that fail), and the header segment of an access
        token (True) and of a refresh token (False), as `jwt.encode` writes them."""
        algorithm = get_default_algorithms()[self.algorithm]
        prepared = algorithm.prepare_key(self.signer)
        too_short = algorithm.check_key_length(prepared)
        if too_short:  # as jwt.encode warns (PyJWT's default: a warning, not an error)
            warnings.warn(too_short, InsecureKeyLengthWarning, stacklevel=2)
        headers = {
            access: base64url_encode(
                json.dumps(
                    {"typ": ACCESS_TYP if access else REFRESH_TYP, "alg": self.algorithm, "kid": self.kid},
                    separators=(",", ":"),
                    sort_keys=True,
                ).encode()
            )
            for access in (True, False)
        }
        return algorithm, prepared, headers


@dataclass(frozen=True)
class KeySet:
    algorithm: str
    keys: dict[str, Key]
    signing: Key | None
    jwks_body: bytes
    etag: str
    loaded_at: float = field(default_factory=time.monotonic)


def _jwks(keys: Iterable[Key]) -> tuple[bytes, str]:
    body = json.dumps({"keys": [k.jwk for k in keys if k.jwk is not None]}, separators=(",", ":")).encode()
    return body, hashlib.sha256(body).hexdigest()[:32]


def _hmac_key_set(config: dict[str, Any]) -> KeySet:
    algorithm = config["JWT_ALGORITHM"]
    keys: dict[str, Key] = {}
    for position, secret in enumerate([config["JWT_SECRET_KEY"], *config.get("JWT_PREVIOUS_SECRET_KEYS", [])]):
        kid = hmac_kid(secret)
        verifier = PyJWK({"kty": "oct", "k": b64url(secret.encode())}, algorithm=algorithm)
        keys.setdefault(kid, Key(kid, algorithm, ACTIVE if position == 0 else STANDBY, verifier, signer=None))
    current = hmac_kid(config["JWT_SECRET_KEY"])
    signing = Key(current, algorithm, ACTIVE, keys[current].verifier, signer=config["JWT_SECRET_KEY"])
    keys[current] = signing
    body, etag = _jwks([])
    return KeySet(algorithm, keys, signing, body, etag)


def _load_key_set(config: dict[str, Any]) -> KeySet:
    """The published keys of the configured algorithm, read from the database."""
    algorithm = config["JWT_ALGORITHM"]
    with unit_of_work() as db:
        rows = db.scalars(
            select(SigningKey)
            .where(SigningKey.algorithm == algorithm, SigningKey.state.in_((STANDBY, ACTIVE)))
            .order_by(SigningKey.created_at, SigningKey.kid)
        ).all()
    keys: dict[str, Key] = {}
    signing = None
    for row in rows:
        jwk = json.loads(row.public_jwk)
        verifier = PyJWK(jwk, algorithm=algorithm)
        if row.state == ACTIVE:
            private = unseal(row.private_key_sealed or b"", row.kid, algorithm, config)
            key = signing = Key(row.kid, algorithm, ACTIVE, verifier, signer=private, jwk=jwk)
        else:
            key = Key(row.kid, algorithm, STANDBY, verifier, jwk=jwk)
        keys[row.kid] = key
    body, etag = _jwks(keys.values())
    return KeySet(algorithm, keys, signing, body, etag)


class KeyRing:
    """One app's key set in this process, re-read when it is older than the reload interval."""

    def __init__(self, app: Flask) -> None:
        # What the keys need of the configuration, taken once at set-up.
        self.config = {
            name: app.config.get(name)
            for name in ("JWT_ALGORITHM", "JWT_SECRET_KEY", "JWT_PREVIOUS_SECRET_KEYS", "JWT_KEYS_RELOAD_SECONDS")
        }
        self.longest_token = max(app.config["JWT_ACCESS_TOKEN_EXPIRES"], app.config["JWT_REFRESH_TOKEN_EXPIRES"])
        self.algorithm = app.config["JWT_ALGORITHM"]
        self.asymmetric = self.algorithm in ASYMMETRIC_ALGORITHMS
        self.interval = app.config["JWT_KEYS_RELOAD_SECONDS"]
        self.unknown_kid_interval = min(UNKNOWN_KID_RELOAD_SECONDS, self.interval)
        self._lock = threading.Lock()
        self._set: KeySet | None = None if self.asymmetric else _hmac_key_set(app.config)
        self._last_attempt = float("-inf")  # never tried
        # Access tokens verified by this process: token -> (key, exp, claims); None: off
        # (speedups.verified_tokens turns it on).
        self.verified: dict[str, tuple[Key, int, dict[str, Any]]] | None = None

    def current(self) -> KeySet:
        keyset = self._set
        if keyset is not None and (not self.asymmetric or time.monotonic() - keyset.loaded_at < self.interval):
            return keyset
        return self._reload(keyset, forced=False)

    def find(self, kid: str) -> Key | None:
        """The published key named `kid`, after one bounded reload if it is unknown."""
        keyset = self.current() if self.asymmetric else self._set
        key = keyset.keys.get(kid)  # type: ignore[union-attr]
        if key is None and self.asymmetric and time.monotonic() - self._last_attempt >= self.unknown_kid_interval:
            key = self._reload(keyset, forced=True).keys.get(kid)
        return key

    def still_verifies(self, key: Key, exp: int) -> bool:
        """Whether an access token that `key` verified, expiring at `exp`, would verify
        again now: not expired (PyJWT's rule: whole seconds, `exp` > now) and `key` still
        the one its kid names (a reloaded key set has new keys: the token is checked again)."""
        # The real time, not clock.now(): this stands in for PyJWT's own `exp` check, which
        # reads the real time, and must agree with it even while a test holds clock.now()
        # back (it would keep a token PyJWT refuses).
        if int(time.time()) >= exp:
            return False
        sole = self.sole_hmac_key()
        if sole is not None:
            return sole is key
        return self.find(key.kid) is key

    def sole_hmac_key(self) -> Key | None:
        """The one key of an HMAC key set without previous secrets: every token of this
        deployment names it, so no header needs reading first to find it (None otherwise)."""
        keyset = self._set
        if self.asymmetric or keyset is None or len(keyset.keys) != 1:
            return None
        return keyset.signing

    def reset(self) -> None:
        """Forget the key set: the next use reads it again (operator commands, tests)."""
        if self.asymmetric:
            with self._lock:
                self._set = None

    def _reload(self, stale: KeySet | None, *, forced: bool) -> KeySet:
        with self._lock:
            if self._set is not None and self._set is not stale:  # another thread reloaded meanwhile
                return self._set
            now = time.monotonic()
            if stale is not None and not forced and now - self._last_attempt < self.unknown_kid_interval:
                return stale  # the last attempt failed a moment ago: keep serving the known keys
            self._last_attempt = now
            try:
                self._set = _load_key_set(self.config)
            except AppError:
                if stale is None or forced:
                    raise
                # The database is out of reach: the known keys keep verifying, and the
                # request's own session check reports the outage.
                log.warning("signing keys not reloaded", extra={"event": "signing_keys_reload_failed"})
                return stale
            return self._set


def ring(app: Flask | None = None) -> KeyRing:
    return (app or current_app).extensions["authapp_keys"]


# -- Tokens -------------------------------------------------------------------------------


def sign(claims: dict[str, Any], signing: Key, *, access: bool) -> str:
    """A token of `claims` signed by `signing` (from `signing_key()`), `kid` and `typ` in its
    header: the bytes `jwt.encode(claims, signing.signer, algorithm, headers={"kid", "typ"})`
    gives (tests/test_signing_keys.py compares them), for claims of strings, numbers and
    lists (no datetime: mint_pair writes times as integers)."""
    algorithm, prepared, headers = signing.signing_parts
    signing_input = headers[access] + b"." + base64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    return (signing_input + b"." + base64url_encode(algorithm.sign(signing_input, prepared))).decode()


def signing_key() -> Key:
    signing = ring().current().signing
    if signing is None:
        log.error("no active signing key", extra={"event": "no_active_signing_key"})
        raise NoSigningKey(headers={"Retry-After": str(ring().interval)})
    return signing


def _refuse(reason: str) -> NoReturn:
    raise jwt.InvalidTokenError(reason)


class WrongTokenType(jwt.InvalidTokenError):
    """A well-signed token of ours of the other type: an access token where a refresh token
    is required."""


def check_shape(header: dict[str, Any], claims: dict[str, Any], algorithm: str) -> None:
    """The contract's rules for a token's header and claims, before any signature is checked."""
    if not ALLOWED_HEADER.issuperset(header):
        _refuse(f"header parameter not allowed: {sorted(set(header) - ALLOWED_HEADER)[0]}")
    if header.get("alg") != algorithm:
        _refuse("algorithm not allowed")
    token_type = claims.get("type")
    rules = _REQUIRED.get(token_type) if isinstance(token_type, str) else None
    if rules is None:
        _refuse("unknown token type")
    typ, required = rules
    # A refresh token minted before tokens carried a typ of ours has PyJWT's, or none.
    if header.get("typ", REFRESH_TYP) != typ:
        _refuse("wrong typ for this token type")
    if not required.issubset(claims):
        _refuse(f"missing claim: {sorted(required - claims.keys())[0]}")
    if not is_user_id(claims["sub"]):
        _refuse("sub must be a user id")
    if not (isinstance(claims["sid"], str) and isinstance(claims["jti"], str)):
        _refuse("sid and jti must be strings")


def is_user_id(sub: Any) -> bool:
    """A `sub` of ASCII decimal digits only (no sign, space, leading zero or other digits)."""
    return isinstance(sub, str) and _USER_ID.fullmatch(sub) is not None


def decode_key(header: dict[str, Any], claims: dict[str, Any]) -> PyJWK:
    """flask-jwt-extended's decode key loader: the token's shape, then the key its kid names."""
    keyring: KeyRing = current_app.extensions["authapp_keys"]
    check_shape(header, claims, keyring.algorithm)
    kid = header.get("kid")
    if kid is None and not keyring.asymmetric and claims["type"] == "refresh":
        # A refresh token minted before tokens carried a kid: JWT_SECRET_KEY signed it.
        kid = keyring.current().signing.kid  # type: ignore[union-attr]
    if not isinstance(kid, str):
        _refuse("kid is required")
    key = keyring.find(kid)
    if key is None:
        _refuse("no published key has this kid")
    return key.verifier


def _unverified_kid(encoded: str) -> Any:
    """The `kid` of a token's header, read without checking anything else: which key to
    verify it with. PyJWT then decodes and checks the whole token, this header included."""
    try:
        header = json.loads(base64url_decode(encoded.split(".", 1)[0]))
    except (ValueError, TypeError, RecursionError, binascii.Error):  # JSON, UTF-8, base64
        _refuse("invalid header")
    return header.get("kid") if isinstance(header, dict) else None


def _check_kid(header: dict[str, Any], key: Key) -> None:
    """The token names the key that verified it (a token verified by the sole HMAC key
    without its kid read first must name that key too)."""
    if header.get("kid") != key.kid:
        _refuse("no published key has this kid")


def _decode(encoded: str, key: Key, algorithm: str, *, verify_exp: bool) -> dict[str, Any]:
    """PyJWT's decode of a token: signature, algorithm, iss, aud, times, the common claims."""
    current = settings.current()
    return jwt.decode_complete(
        encoded,
        key.verifier,
        algorithms=[algorithm],
        audience=current.token_audience,
        issuer=current.token_issuer,
        options={"require": list(COMMON_CLAIMS), "verify_exp": verify_exp},
    )


def decode_access_token(encoded: str) -> dict[str, Any]:
    """The claims of an access token, checked once in one PyJWT decode: the key its `kid`
    names, the configured algorithm, `iss`, `aud`, `exp`/`nbf`/`iat`, then the contract's
    rules (`check_shape`: header parameters, typ at+jwt, every claim, `sub` a user id) and
    type access. A failure raises what flask-jwt-extended's own verification raises, so
    its error handlers answer through the same loaders (authapp/auth/tokens.py init_app).

    A token this process verified before (`KeyRing.verified`, the `verified_tokens`
    speed-up) is not decoded again while it has not expired and the key that verified it
    is still the one its kid names: its claims are what they were (a copy). Only the
    token's own checks are remembered, never its session: every request still reads the
    session, so a revocation takes effect at once.
    """
    keyring: KeyRing = current_app.extensions["authapp_keys"]
    verified = keyring.verified
    if verified is not None:
        known = verified.get(encoded)
        if known is not None and keyring.still_verifies(known[0], known[1]):
            return dict(known[2])
    key = keyring.sole_hmac_key()
    if key is None:  # several keys: the header's kid names the one to verify with
        kid = _unverified_kid(encoded)
        key = keyring.find(kid) if isinstance(kid, str) else None
        if key is None:
            _refuse("no published key has this kid")
    claims = _verify_access_token(encoded, key, keyring.algorithm)
    if verified is not None and isinstance(claims["exp"], int):
        if len(verified) >= VERIFIED_TOKENS_KEPT:
            verified.clear()  # bounded; the tokens in use come back at their next request
        verified[encoded] = (key, claims["exp"], dict(claims))
    return claims


# How many verified access tokens each process remembers (KeyRing.verified).
VERIFIED_TOKENS_KEPT = 4096


def _verify_access_token(encoded: str, key: Key, algorithm: str) -> dict[str, Any]:
    """decode_access_token's checks of one token with the key that must verify it."""
    try:
        decoded = _decode(encoded, key, algorithm, verify_exp=True)
    except jwt.ExpiredSignatureError as expired:
        # As before the signature: a token of the wrong shape is INVALID_TOKEN, even expired.
        late = _decode(encoded, key, algorithm, verify_exp=False)
        _check_kid(late["header"], key)
        check_shape(late["header"], late["payload"], algorithm)
        expired.jwt_header, expired.jwt_data = late["header"], late["payload"]  # type: ignore[attr-defined]
        raise
    claims = decoded["payload"]
    _check_kid(decoded["header"], key)
    check_shape(decoded["header"], claims, algorithm)
    if claims["type"] != "access":
        _refuse("not an access token")
    return claims


def _refresh_key(keyring: KeyRing, encoded: str) -> Key:
    """The key that verifies a refresh token: the sole HMAC key, else the one its `kid`
    names, or JWT_SECRET_KEY's for a token without a kid (minted before tokens carried one)."""
    key = keyring.sole_hmac_key()
    if key is None:
        kid = _unverified_kid(encoded)
        if kid is None and not keyring.asymmetric:
            key = keyring.current().signing
        else:
            key = keyring.find(kid) if isinstance(kid, str) else None
        if key is None:
            _refuse("no published key has this kid")
    return key


def _check_refresh_kid(header: dict[str, Any], key: Key, keyring: KeyRing) -> None:
    """`_check_kid`, with a refresh token that names no key taken as JWT_SECRET_KEY's."""
    if "kid" in header or keyring.asymmetric or key is not keyring.current().signing:
        _check_kid(header, key)


def decode_refresh_token(encoded: str, *, verify_exp: bool = True) -> dict[str, Any]:
    """The claims of a refresh token, checked as `decode_access_token` checks an access
    token (typ JWT or none, type refresh), in one PyJWT decode instead of
    flask-jwt-extended's three; a refresh token without a kid (minted before tokens
    carried one) is verified with JWT_SECRET_KEY. Raises PyJWT's errors
    (`jwt.ExpiredSignatureError` for an expired one, `WrongTokenType` for an access token)."""
    keyring: KeyRing = current_app.extensions["authapp_keys"]
    key = _refresh_key(keyring, encoded)
    try:
        decoded = _decode(encoded, key, keyring.algorithm, verify_exp=verify_exp)
    except jwt.ExpiredSignatureError:
        # As before the signature: a token of the wrong shape is INVALID_TOKEN, even expired.
        late = _decode(encoded, key, keyring.algorithm, verify_exp=False)
        _check_refresh_kid(late["header"], key, keyring)
        check_shape(late["header"], late["payload"], keyring.algorithm)
        raise
    claims = decoded["payload"]
    _check_refresh_kid(decoded["header"], key, keyring)
    check_shape(decoded["header"], claims, keyring.algorithm)
    if claims["type"] != "refresh":
        raise WrongTokenType("not a refresh token")
    return claims


def _encode_key_unused(_identity: Any) -> Any:
    raise RuntimeError("authapp signs tokens with keys.sign, not flask-jwt-extended")


# -- Operator commands --------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    algorithm: str
    state: str
    created_at: datetime
    activated_at: datetime | None
    deactivated_at: datetime | None
    retired_at: datetime | None

    @classmethod
    def of(cls, row: SigningKey) -> KeyInfo:
        return cls(
            row.kid, row.algorithm, row.state, row.created_at, row.activated_at, row.deactivated_at, row.retired_at
        )


def _require_asymmetric() -> str:
    algorithm = ring().algorithm
    if algorithm in HMAC_ALGORITHMS:
        raise KeyStateError(
            f"JWT_ALGORITHM={algorithm} signs with JWT_SECRET_KEY; signing keys are for "
            f"{', '.join(ASYMMETRIC_ALGORITHMS)} (rotate an HMAC secret with JWT_PREVIOUS_SECRET_KEYS)"
        )
    return algorithm


def generate(*, activate: bool = False) -> KeyInfo:
    """A new key pair of the configured algorithm, standby (published, not signing) unless `activate`."""
    algorithm = _require_asymmetric()
    private = new_private_key(algorithm)
    jwk = public_jwk(private, algorithm)
    now = clock.now()
    row = SigningKey(
        kid=jwk["kid"],
        algorithm=algorithm,
        state=STANDBY,
        public_jwk=json.dumps(jwk, separators=(",", ":")),
        private_key_sealed=seal(private, jwk["kid"], algorithm, ring().config),
        created_at=now,
    )
    with unit_of_work() as db:
        db.add(row)
    audit.record(KEY_GENERATED, kid=row.kid, algorithm=algorithm, by="operator")
    info = KeyInfo.of(row)
    if activate:
        info = activate_key(row.kid)
    ring().reset()
    return info


def activate_key(kid: str) -> KeyInfo:
    """Make `kid` the signing key; the key that signed until now stays published (standby)."""
    algorithm = _require_asymmetric()
    now = clock.now()
    try:
        with unit_of_work() as db:
            row = db.get(SigningKey, kid)
            if row is None:
                raise NotFound(f"No signing key {kid!r} (see `keys list`)")
            if row.state == RETIRED:
                raise KeyStateError(f"key {kid} is retired: a retired key never signs again; generate a new one")
            if row.algorithm != algorithm:
                raise KeyStateError(f"key {kid} is {row.algorithm} but JWT_ALGORITHM={algorithm}")
            if row.state == ACTIVE:
                return KeyInfo.of(row)
            db.execute(update(SigningKey).where(SigningKey.state == ACTIVE).values(state=STANDBY, deactivated_at=now))
            db.flush()
            row.state, row.activated_at = ACTIVE, now
    except IntegrityError:
        raise KeyStateError("another key was activated at the same moment; run `keys list` and try again") from None
    audit.record(KEY_ACTIVATED, kid=kid, algorithm=algorithm, by="operator")
    ring().reset()
    return KeyInfo.of(row)


def retire_key(kid: str, *, force: bool = False) -> KeyInfo:
    """Stop publishing and accepting `kid`, and erase its private part.

    Refused for the active key, and for a key that signed tokens which may still be
    unexpired (unless `force`: a compromised key, whose users must log in again)."""
    now = clock.now()
    longest = ring().longest_token
    with unit_of_work() as db:
        row = db.get(SigningKey, kid)
        if row is None:
            raise NotFound(f"No signing key {kid!r} (see `keys list`)")
        if row.state == RETIRED:
            return KeyInfo.of(row)
        if row.state == ACTIVE:
            raise KeyStateError(f"key {kid} is the active key: activate another key first")
        if not force and row.deactivated_at is not None and now - row.deactivated_at < longest:
            until = row.deactivated_at + longest
            raise KeyStateError(
                f"key {kid} signed tokens that are valid until {until.isoformat(timespec='seconds')}; "
                "retiring it now logs their users out (use --force for a compromised key)"
            )
        row.state, row.retired_at, row.private_key_sealed = RETIRED, now, None
    audit.record(KEY_RETIRED, kid=kid, algorithm=row.algorithm, forced=force, by="operator")
    ring().reset()
    return KeyInfo.of(row)


def list_keys() -> list[KeyInfo]:
    with unit_of_work() as db:
        rows = db.scalars(select(SigningKey).order_by(SigningKey.created_at, SigningKey.kid)).all()
    return [KeyInfo.of(row) for row in rows]


def published_for(info: KeyInfo) -> timedelta:
    """How long a key has been published (a verifier's cache learns it within JWKS_MAX_AGE
    plus the reload interval)."""
    return clock.now() - info.created_at


# -- Start-up -----------------------------------------------------------------------------


def require_signing_key(app: Flask) -> None:
    """Stop a production start that could sign no token (wsgi.py calls it)."""
    if app.config["ENVIRONMENT"] != "production" or app.config["JWT_ALGORITHM"] in HMAC_ALGORITHMS:
        return
    with app.app_context():
        try:
            keyset = ring(app).current()
        except UnsealableKey as error:
            raise ConfigError(error.reason) from None
        except AppError as error:
            raise ConfigError(f"signing keys cannot be read: {error.detail}") from None
        except SQLAlchemyError as error:  # the table is missing: the migrations have not run
            raise ConfigError(
                f"signing keys cannot be read ({type(error).__name__}): run `flask --app wsgi db upgrade`"
            ) from None
    if keyset.signing is None:
        raise ConfigError(
            f"no active signing key for JWT_ALGORITHM={app.config['JWT_ALGORITHM']}: "
            "run `flask --app wsgi keys generate --activate`"
        )


def init_app(app: Flask, jwt_manager: Any) -> None:
    """The app's key ring, and flask-jwt-extended's key loaders."""
    app.extensions["authapp_keys"] = KeyRing(app)
    jwt_manager.decode_key_loader(decode_key)
    jwt_manager.encode_key_loader(_encode_key_unused)
