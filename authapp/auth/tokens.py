"""JWTs on top of flask-jwt-extended: minting a session's pair, decoding refresh tokens,
and every flask-jwt-extended failure routed into the error envelope.

A refresh token's `jti` is random for the first token of a session; each later one is
derived from its parent's (HMAC keyed with JWT_SECRET_KEY, whatever the signing
algorithm), and the access token's `jti` from its refresh token's. With the issue time
stored server-side, the pair of any refresh token can be minted again with the same
claims, which is how a retired token replayed inside the reuse interval gets the
session's current pair back without any token kept in clear. (HS*, RS256 and EdDSA give
the same bytes again; ES256 signatures are randomised, so its pair is signed anew.) When
JWT_SECRET_KEY changes, the chains derived under an older secret are followed with the
secrets of JWT_PREVIOUS_SECRET_KEYS.

Tokens are signed by `keys.sign` and verified by `keys.decode_access_token` and
`keys.decode_refresh_token` (one PyJWT decode each); flask-jwt-extended keeps
`keys.decode_key` as its key loader, and its error loaders answer in the envelope
(authapp/auth/keys.py).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import TYPE_CHECKING, Any

from flask_jwt_extended import JWTManager
from jwt import ExpiredSignatureError, InvalidTokenError

from .. import settings
from ..errors import InvalidToken, MissingToken, TokenExpired, TokenRevoked, app_error_response
from . import keys

if TYPE_CHECKING:
    from ..models import AuthSession, RefreshToken

TOKEN_TYPE = "bearer"


def new_jti() -> str:
    return uuid.uuid4().hex


def jti_hash(jti: str) -> str:
    """What the database keeps of a refresh token."""
    return hashlib.sha256(jti.encode()).hexdigest()


def _derive(jti: str, purpose: str, key: bytes | None = None) -> str:
    key = key or settings.current().token_derivation_key
    return hmac.new(key, f"{purpose}:{jti}".encode(), hashlib.sha256).hexdigest()[:32]


def child_jti(parent_jti: str) -> str:
    return _derive(parent_jti, "refresh")


def child_jti_candidates(parent_jti: str) -> list[str]:
    """The jti a child of `parent_jti` has under JWT_SECRET_KEY, then under each previous
    secret (a chain that began before the secret changed)."""
    current = settings.current()
    derivation_keys = (current.token_derivation_key, *current.previous_token_derivation_keys)
    return list(dict.fromkeys(_derive(parent_jti, "refresh", key) for key in derivation_keys))


def mint_pair(user: Any, session: AuthSession, refresh: RefreshToken, refresh_jti: str) -> dict[str, Any]:
    """The TokenResponse of one refresh token row; the same row always gives the same pair."""
    iat = int(refresh.issued_at.timestamp())
    access_ttl = int(settings.current().access_token_lifetime.total_seconds())
    access_exp = min(iat + access_ttl, int(session.expires_at.timestamp()))
    current = settings.current()
    common = {
        "sub": str(user.id),
        "sid": session.id,
        "iat": iat,
        "nbf": iat,
        "iss": current.token_issuer,
        "aud": current.token_audience,
    }
    signing = keys.signing_key()  # one key for both tokens, even if a rotation lands meanwhile
    access = {**common, "exp": access_exp, "jti": _derive(refresh_jti, "access"), "type": "access"}
    refresh_claims = {**common, "exp": int(refresh.expires_at.timestamp()), "jti": refresh_jti, "type": "refresh"}
    return {
        # The session's level (auth.mfa raises it), which its refreshes keep.
        "access_token": keys.sign({**access, "aal": session.aal, "amr": session.amr.split()}, signing, access=True),
        "refresh_token": keys.sign(refresh_claims, signing, access=False),
        "token_type": TOKEN_TYPE,
        "expires_in": access_exp - iat,
        "aal": session.aal,
        "user": user,
    }


def decode_refresh_token(encoded: str, *, allow_expired: bool = False) -> dict[str, Any]:
    """The claims of a well-signed refresh token, or INVALID_TOKEN / TOKEN_EXPIRED."""
    try:
        return keys.decode_refresh_token(encoded, verify_exp=not allow_expired)
    except ExpiredSignatureError:
        raise TokenExpired() from None
    except keys.WrongTokenType:
        raise InvalidToken("A refresh token is required") from None
    except (InvalidTokenError, ValueError, TypeError):
        raise InvalidToken() from None


def init_app(jwt: JWTManager) -> None:
    """Every flask-jwt-extended failure in the error envelope. The session behind a token
    is checked by `auth.context.authenticate`, which the protected views call."""
    jwt.expired_token_loader(lambda _h, _c: app_error_response(TokenExpired()))
    jwt.invalid_token_loader(lambda _reason: app_error_response(InvalidToken()))
    jwt.unauthorized_loader(lambda _reason: app_error_response(MissingToken()))
    jwt.revoked_token_loader(lambda _h, _c: app_error_response(TokenRevoked()))
    jwt.needs_fresh_token_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.token_verification_failed_loader(lambda _h, _c: app_error_response(InvalidToken()))
    jwt.user_lookup_error_loader(lambda _h, _c: app_error_response(InvalidToken()))
