"""Password policy and hashing.

Hashing scheme: bcrypt over a SHA-256 pre-hash. The password is NFKC-normalised, encoded
as UTF-8, hashed with SHA-256 and base64-encoded (44 ASCII bytes), and that string is
what bcrypt hashes. bcrypt reads at most 72 bytes (and bcrypt 5 raises above that), so
hashing the raw UTF-8 would either fail or silently cut long passwords; the pre-hash makes
every character count, for any length the policy allows. Base64 keeps NUL bytes out of
bcrypt's input. The stored value is a standard `$2b$` bcrypt hash at `BCRYPT_ROUNDS`.
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata
from functools import cache

import bcrypt
from zxcvbn.frequency_lists import FREQUENCY_LISTS

MAX_LENGTH = 128


def normalize(password: str) -> str:
    """The form of a password that is measured, checked and hashed."""
    return unicodedata.normalize("NFKC", password)


def _bcrypt_input(password: str) -> bytes:
    digest = hashlib.sha256(normalize(password).encode("utf-8")).digest()
    return base64.b64encode(digest)


def hash_password(password: str, rounds: int) -> str:
    return bcrypt.hashpw(_bcrypt_input(password), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(_bcrypt_input(password), hashed.encode("ascii"))
    except ValueError:  # a malformed stored hash never matches
        return False


@cache
def dummy_hash(rounds: int) -> str:
    """A hash of the same cost, checked for unknown users so timing does not tell."""
    return hash_password("authapp-dummy-password-for-timing", rounds)


@cache
def common_passwords() -> frozenset[str]:
    """The 30,000 most common passwords of zxcvbn's frequency list, lowercased."""
    return frozenset(p.lower() for p in FREQUENCY_LISTS["passwords"])


def policy_problems(password: str, *, min_length: int, username: str | None, email: str | None) -> list[str]:
    """Why a new password is refused (empty when it is acceptable)."""
    normalized = normalize(password)
    length = len(normalized)
    if length < min_length:
        return [f"Password must be at least {min_length} characters long."]
    if length > MAX_LENGTH:
        return [f"Password must be at most {MAX_LENGTH} characters long."]
    problems = []
    folded = normalized.casefold()
    if folded in common_passwords():
        problems.append("This password is too common; choose one that is harder to guess.")
    if username and username.casefold() in folded:
        problems.append("Password must not contain the username.")
    local_part = email.rsplit("@", 1)[0].casefold() if email and "@" in email else ""
    # A very short local part ("a@x.io") would forbid most passwords; three characters
    # matches the shortest allowed username.
    if len(local_part) >= 3 and local_part in folded:
        problems.append("Password must not contain the email address.")
    return problems


def needs_rehash(hashed: str, rounds: int) -> bool:
    """True when a stored hash was made at another cost than the configured one."""
    parts = hashed.split("$")
    return len(parts) < 3 or parts[2] != f"{rounds:02d}"
