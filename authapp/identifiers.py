"""The one form an email address is compared and stored in, and the check for existing
accounts whose addresses share it."""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Iterable


def canonical_email(address: str) -> str:
    """NFKC-normalised and lowercased, the whole address: look-alikes such as fullwidth
    letters (`ｊｏｈｎ`) or ligatures (`ﬁ`) become the plain letters they stand for."""
    # Lowercasing can leave a string that NFKC changes again (and the reverse): both twice.
    text = unicodedata.normalize("NFKC", address.strip()).lower()
    return unicodedata.normalize("NFKC", text).lower()


def collisions(users: Iterable[tuple[int, str]]) -> dict[str, list[tuple[int, str]]]:
    """Of (id, email) pairs, the groups of two or more whose addresses share one canonical
    form, by that form."""
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for user_id, email in users:
        groups[canonical_email(email)].append((user_id, email))
    return {form: sorted(members) for form, members in sorted(groups.items()) if len(members) > 1}
