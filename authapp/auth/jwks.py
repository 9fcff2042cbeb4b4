"""GET /.well-known/jwks.json: the public keys that verify access tokens (RFC 7517)."""

from __future__ import annotations

from flask import Response, request
from marshmallow import Schema, fields

from ..openapi import Blueprint
from . import keys

blp = Blueprint("jwks", __name__, url_prefix="/.well-known", description="Public keys for verifying access tokens")


class JwkSchema(Schema):
    kty = fields.String(metadata={"enum": ["RSA", "EC", "OKP"]})
    kid = fields.String(metadata={"description": "RFC 7638 SHA-256 thumbprint of the key"})
    alg = fields.String(metadata={"enum": ["RS256", "ES256", "EdDSA"]})
    use = fields.String(metadata={"enum": ["sig"]})
    crv = fields.String(metadata={"description": "EC and OKP keys: P-256 or Ed25519"})
    x = fields.String()
    y = fields.String(metadata={"description": "EC keys"})
    n = fields.String(metadata={"description": "RSA keys"})
    e = fields.String(metadata={"description": "RSA keys"})


class JwksSchema(Schema):
    keys = fields.List(fields.Nested(JwkSchema))


@blp.get("/jwks.json")
@blp.response(
    200,
    JwksSchema,
    description="The standby and active keys of the configured algorithm, public parts only; "
    "empty with HS256/384/512. Cacheable for 300 s; answers 304 to a matching If-None-Match.",
    headers={
        "Cache-Control": {"schema": {"type": "string"}, "example": "public, max-age=300"},
        "ETag": {"schema": {"type": "string"}},
    },
)
@blp.alt_response(304, description="Not modified (If-None-Match matched the ETag)")
@blp.alt_response(500, response="INTERNAL_SERVER_ERROR")
@blp.alt_response(503, response="SERVICE_UNAVAILABLE")
def jwks():
    """The key set verifiers fetch to check access tokens without any secret."""
    keyset = keys.ring().current()
    response = Response(keyset.jwks_body, mimetype="application/json")
    response.set_etag(keyset.etag)
    response.cache_control.public = True
    response.cache_control.max_age = keys.JWKS_MAX_AGE
    return response.make_conditional(request)
