"""marshmallow schemas: what comes in, what goes out, and the error envelope's shape."""

from __future__ import annotations

import re
from typing import Any

from email_validator import EmailNotValidError, validate_email
from flask import g
from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from . import settings
from .auth import passwords
from .clock import iso
from .identifiers import canonical_email

# The rules of the fields below, which also show them in the OpenAPI document (their
# `minLength`, `maxLength`, `pattern` and `format`), so the docs pages give them.
USERNAME_MIN_LENGTH = 3
USERNAME_MAX_LENGTH = 50
USERNAME_PATTERN = rf"^[A-Za-z0-9_.-]{{{USERNAME_MIN_LENGTH},{USERNAME_MAX_LENGTH}}}$"
USERNAME_RE = re.compile(USERNAME_PATTERN)
EMAIL_MAX_LENGTH = 100
TOTP_CODE_PATTERN = r"^[0-9]{6}$"
TOTP_CODE_RE = re.compile(r"[0-9]{6}")  # ASCII digits only: \d would take other scripts' digits


class Timestamp(fields.DateTime):
    """A UTC timestamp as the contract writes it: `2024-01-15T10:30:45.123Z`."""

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else iso(value)


class Text(fields.String):
    """A string that can be stored and hashed: valid Unicode (no lone surrogates, which
    JSON can carry but UTF-8 cannot), and no NUL unless `allow_nul` (PostgreSQL refuses
    NUL in text)."""

    def __init__(self, *args: Any, allow_nul: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_nul = allow_nul

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("Not valid Unicode text (lone surrogate).") from None
        if not self.allow_nul and "\x00" in text:
            raise ValidationError("Must not contain NUL characters.")
        return text


def _with_rules(kwargs: dict[str, Any], **rules: Any) -> dict[str, Any]:
    """`kwargs` with the field's rules added to its metadata (apispec documents them)."""
    return {**kwargs, "metadata": {**rules, **kwargs.get("metadata", {})}}


class Email(Text):
    """An email address: trimmed, NFKC-normalised and lowercased as a whole (look-alike
    letters are the same address), syntax-checked, then at most 100 characters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_with_rules(kwargs, format="email", maxLength=EMAIL_MAX_LENGTH))

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip()
        if len(text) > EMAIL_MAX_LENGTH:
            raise ValidationError(f"Email must be at most {EMAIL_MAX_LENGTH} characters.")
        try:
            normalized = canonical_email(validate_email(canonical_email(text), check_deliverability=False).normalized)
        except EmailNotValidError as exc:
            raise ValidationError(f"Not a valid email address: {exc}") from None
        # NFKC and lowercasing can lengthen a string ("ﬁ", "İ"): measure after them.
        if len(normalized) > EMAIL_MAX_LENGTH:
            raise ValidationError(f"Email must be at most {EMAIL_MAX_LENGTH} characters.")
        return normalized


class Username(Text):
    """3 to 50 ASCII letters, digits, `_`, `.` or `-`; case is kept, uniqueness ignores it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        rules = {"minLength": USERNAME_MIN_LENGTH, "maxLength": USERNAME_MAX_LENGTH, "pattern": USERNAME_PATTERN}
        super().__init__(*args, **_with_rules(kwargs, **rules))

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not USERNAME_RE.fullmatch(text):
            raise ValidationError("Username must be 3 to 50 characters of letters, digits, '_', '.' or '-'.")
        return text


class Password(Text):
    """A password as sent (any Unicode, NUL included); its policy needs the other fields,
    so the schema checks it. `new=True` marks a password being chosen, whose minimum
    length (PASSWORD_MIN_LENGTH, a setting) the OpenAPI document gives too."""

    def __init__(self, *args: Any, new: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, allow_nul=True, **_with_rules(kwargs, maxLength=passwords.MAX_LENGTH))
        self.new = new

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(passwords.normalize(text)) > passwords.MAX_LENGTH:
            raise ValidationError(f"Password must be at most {passwords.MAX_LENGTH} characters long.")
        return text


def _check_new_password(password: str, *, username: str | None, email: str | None, field: str) -> None:
    problems = passwords.policy_problems(
        password,
        min_length=settings.current().password_min_length,
        username=username,
        email=email,
    )
    if problems:
        raise ValidationError(problems, field)


class RegisterSchema(Schema):
    email = Email(required=True, metadata={"example": "user@example.com"})
    username = Username(required=True, metadata={"example": "newuser"})
    password = Password(required=True, new=True, metadata={"example": "correct horse battery staple"})

    @validates_schema(skip_on_field_errors=False)
    def _password_policy(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "password" in data:
            _check_new_password(
                data["password"], username=data.get("username"), email=data.get("email"), field="password"
            )


class LoginSchema(Schema):
    email = Email(metadata={"description": "Give either email or username."})
    username = Text(metadata={"description": "Give either email or username."})
    password = Password(required=True)

    @validates_schema
    def _one_identifier(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("email" in data) == ("username" in data):
            raise ValidationError("Give exactly one of email or username.", "_body")


class RefreshSchema(Schema):
    refresh_token = Text(required=True)


class LogoutSchema(Schema):
    refresh_token = Text(metadata={"description": "Optional: the session of this refresh token is ended too."})


class ChangePasswordSchema(Schema):
    current_password = Password(required=True)
    new_password = Password(required=True, new=True)

    @validates_schema
    def _password_policy(self, data: dict[str, Any], **kwargs: Any) -> None:
        user = g.auth.user  # the token was checked before the body is parsed (auth.routes)
        _check_new_password(data["new_password"], username=user.username, email=user.email, field="new_password")


def _mfa_enabled_at(user: Any) -> Any:
    """When the user's MFA was turned on: a User read from the database has it loaded
    (authapp.models), and so has the session check's row; a User just inserted has not,
    and has no second factor. Never a query of its own."""
    if hasattr(user, "_sa_instance_state"):
        return user.__dict__.get("mfa_enabled_at")
    return user.mfa_enabled_at


class UserSchema(Schema):
    id = fields.Integer()
    email = fields.String()
    username = fields.String()
    is_active = fields.Boolean()
    created_at = Timestamp()
    last_login = Timestamp(allow_none=True)
    email_verified = fields.Function(
        lambda user: user.email_verified_at is not None,
        metadata={"type": "boolean", "description": "The address was shown to be the user's (a link was used)"},
    )
    mfa_enabled = fields.Function(
        lambda user: _mfa_enabled_at(user) is not None,
        metadata={"type": "boolean", "description": "A second factor (TOTP) is required at login"},
    )


def _aal() -> fields.String:
    return fields.String(metadata={"enum": ["aal1", "aal2"], "description": "The session's assurance level"})


def user_out(user: Any) -> dict[str, Any]:
    """`UserSchema().dump(user)`, written out: the body of every GET /auth/me without
    marshmallow's per-call work. A field added to UserSchema is added here too
    (tests/test_speedups.py checks that the two agree)."""
    last_login = user.last_login
    return {
        "id": int(user.id),
        "email": str(user.email),
        "username": str(user.username),
        "is_active": bool(user.is_active),
        "created_at": iso(user.created_at),
        "last_login": None if last_login is None else iso(last_login),
        "email_verified": user.email_verified_at is not None,
        "mfa_enabled": _mfa_enabled_at(user) is not None,
    }


class TokenResponseSchema(Schema):
    access_token = fields.String(required=True)
    refresh_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "bearer"})
    expires_in = fields.Integer(required=True, metadata={"description": "Access token lifetime in seconds"})
    aal = _aal()
    user = fields.Nested(UserSchema, required=True)


def token_response_out(pair: dict[str, Any]) -> dict[str, Any]:
    """`TokenResponseSchema().dump(pair)` of a pair as `tokens.mint_pair` makes it, written
    out: the body of every POST /auth/refresh without marshmallow's per-call work. A field
    added to TokenResponseSchema is added here too (tests/test_speedups.py checks that the
    two agree)."""
    aal = pair["aal"]
    return {
        "access_token": str(pair["access_token"]),
        "refresh_token": str(pair["refresh_token"]),
        "token_type": str(pair["token_type"]),
        "expires_in": int(pair["expires_in"]),
        "aal": None if aal is None else str(aal),
        "user": user_out(pair["user"]),
    }


class LoginResponseSchema(Schema):
    """A TokenResponse; for an account with MFA on, an MfaChallenge instead: only
    `mfa_required: true`, `mfa_token` and `expires_in` (the challenge's, in seconds), for
    POST /auth/mfa/verify."""

    access_token = fields.String()
    refresh_token = fields.String()
    token_type = fields.String(metadata={"example": "bearer"})
    expires_in = fields.Integer(metadata={"description": "Access token (or MFA challenge) lifetime in seconds"})
    aal = _aal()
    user = fields.Nested(UserSchema)
    mfa_required = fields.Boolean(metadata={"description": "MfaChallenge only: the second factor is needed"})
    mfa_token = fields.String(metadata={"description": "MfaChallenge only: single-use, for POST /auth/mfa/verify"})


class RegisterResponseSchema(Schema):
    """A TokenResponse; with EMAIL_VERIFICATION=required, only `user` and
    `email_verification_required: true` (no session until the address is verified)."""

    access_token = fields.String()
    refresh_token = fields.String()
    token_type = fields.String(metadata={"example": "bearer"})
    expires_in = fields.Integer(metadata={"description": "Access token lifetime in seconds"})
    aal = _aal()
    user = fields.Nested(UserSchema, required=True)
    email_verification_required = fields.Boolean()


class PasswordResetRequestSchema(Schema):
    email = Email(required=True, metadata={"example": "user@example.com"})


class PasswordResetSchema(Schema):
    token = Text(required=True, metadata={"description": "The token of the link's fragment (#token=...)"})
    # A password being chosen; its policy needs the link's user, so authapp.auth.recovery checks it.
    new_password = Password(required=True, new=True)


class VerifyEmailSchema(Schema):
    token = Text(required=True, metadata={"description": "The token of the link's fragment (#token=...)"})


class ChangeEmailSchema(Schema):
    new_email = Email(required=True, metadata={"example": "new@example.com"})
    current_password = Password(required=True)


class TotpCode(Text):
    """A TOTP code: exactly six ASCII digits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **_with_rules(kwargs, pattern=TOTP_CODE_PATTERN, example="123456"))

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not TOTP_CODE_RE.fullmatch(text):
            raise ValidationError("The code must be 6 digits.")
        return text


class MfaSetupResponseSchema(Schema):
    secret = fields.String(metadata={"description": "The TOTP secret (base32), shown this once"})
    otpauth_uri = fields.String(metadata={"description": "otpauth://totp/... for an authenticator app"})
    qr_svg = fields.String(metadata={"description": "The URI as a QR code, an SVG document"})


class MfaEnableSchema(Schema):
    code = TotpCode(required=True)


class RecoveryCodesSchema(Schema):
    recovery_codes = fields.List(fields.String(), metadata={"description": "Single-use codes, shown this once"})


class MfaVerifySchema(Schema):
    mfa_token = Text(required=True, metadata={"description": "The MfaChallenge's token"})
    code = TotpCode(metadata={"description": "Give either code or recovery_code."})
    recovery_code = Text(
        validate=validate.Length(max=64), metadata={"description": "Give either code or recovery_code."}
    )

    @validates_schema
    def _one_factor(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("code" in data) == ("recovery_code" in data):
            raise ValidationError("Give exactly one of code or recovery_code.", "_body")


class CurrentPasswordSchema(Schema):
    current_password = Password(required=True)


class AcceptedSchema(Schema):
    status = fields.String(metadata={"enum": ["accepted"]})


class SessionSchema(Schema):
    id = fields.String()
    created_at = Timestamp()
    last_used_at = Timestamp()
    expires_at = Timestamp()
    ip = fields.String(allow_none=True)
    user_agent = fields.String(allow_none=True)
    aal = _aal()
    amr = fields.List(fields.String(), metadata={"description": "How it was authenticated (RFC 8176): pwd, otp"})
    current = fields.Boolean(metadata={"description": "The session of the access token used"})


class SessionListSchema(Schema):
    sessions = fields.List(fields.Nested(SessionSchema))


class ErrorSchema(Schema):
    """The error envelope every failure answers with."""

    detail = fields.String(required=True)
    error_code = fields.String(required=True, metadata={"example": "INVALID_CREDENTIALS"})
    timestamp = fields.String(required=True, metadata={"example": "2024-01-15T10:30:45.123Z"})
    request_id = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "VALIDATION_ERROR only: messages by field (`_body` for the body)"},
    )


class HealthChecksSchema(Schema):
    database = fields.String(metadata={"enum": ["ok", "error", "read_only", "schema_outdated"]})
    circuit_breaker = fields.String(metadata={"enum": ["closed", "open", "half_open"]})


class HealthSchema(Schema):
    status = fields.String(metadata={"enum": ["healthy", "unhealthy"]})
    timestamp = fields.String()
    version = fields.String()
    checks = fields.Nested(HealthChecksSchema)


class LivenessSchema(Schema):
    status = fields.String(metadata={"enum": ["alive"]})
    timestamp = fields.String()
