"""marshmallow schemas: what comes in, what goes out, and the error envelope's shape."""

from __future__ import annotations

import re
from typing import Any

from email_validator import EmailNotValidError, validate_email
from flask import g
from marshmallow import Schema, ValidationError, fields, validates_schema

from . import settings
from .auth import passwords
from .clock import iso

USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,50}")
EMAIL_MAX_LENGTH = 100


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


class Email(Text):
    """An email address: trimmed, syntax-checked, lowercased, then at most 100 characters."""

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip()
        if len(text) > EMAIL_MAX_LENGTH:
            raise ValidationError(f"Email must be at most {EMAIL_MAX_LENGTH} characters.")
        try:
            normalized = validate_email(text, check_deliverability=False).normalized.lower()
        except EmailNotValidError as exc:
            raise ValidationError(f"Not a valid email address: {exc}") from None
        # Lowercasing can lengthen a string ("İ" becomes two code points): measure after it.
        if len(normalized) > EMAIL_MAX_LENGTH:
            raise ValidationError(f"Email must be at most {EMAIL_MAX_LENGTH} characters.")
        return normalized


class Username(Text):
    """3 to 50 ASCII letters, digits, `_`, `.` or `-`; case is kept, uniqueness ignores it."""

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not USERNAME_RE.fullmatch(text):
            raise ValidationError("Username must be 3 to 50 characters of letters, digits, '_', '.' or '-'.")
        return text


class Password(Text):
    """A password as sent (any Unicode, NUL included); its policy needs the other fields,
    so the schema checks it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_nul=True, **kwargs)

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
    password = Password(required=True, metadata={"example": "correct horse battery staple"})

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
    new_password = Password(required=True)

    @validates_schema
    def _password_policy(self, data: dict[str, Any], **kwargs: Any) -> None:
        user = g.auth.user  # the token was checked before the body is parsed (auth.routes)
        _check_new_password(data["new_password"], username=user.username, email=user.email, field="new_password")


class UserSchema(Schema):
    id = fields.Integer()
    email = fields.String()
    username = fields.String()
    is_active = fields.Boolean()
    created_at = Timestamp()
    last_login = Timestamp(allow_none=True)


class TokenResponseSchema(Schema):
    access_token = fields.String(required=True)
    refresh_token = fields.String(required=True)
    token_type = fields.String(required=True, metadata={"example": "bearer"})
    expires_in = fields.Integer(required=True, metadata={"description": "Access token lifetime in seconds"})
    user = fields.Nested(UserSchema, required=True)


class SessionSchema(Schema):
    id = fields.String()
    created_at = Timestamp()
    last_used_at = Timestamp()
    expires_at = Timestamp()
    ip = fields.String(allow_none=True)
    user_agent = fields.String(allow_none=True)
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
    database = fields.String(metadata={"enum": ["ok", "error"]})
    circuit_breaker = fields.String(metadata={"enum": ["closed", "open", "half_open"]})


class HealthSchema(Schema):
    status = fields.String(metadata={"enum": ["healthy", "unhealthy"]})
    timestamp = fields.String()
    version = fields.String()
    checks = fields.Nested(HealthChecksSchema)


class LivenessSchema(Schema):
    status = fields.String(metadata={"enum": ["alive"]})
    timestamp = fields.String()
