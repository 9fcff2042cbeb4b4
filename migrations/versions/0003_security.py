"""security: login attempts counted in the database, email addresses in one canonical form

Revision ID: 0003_security
Revises: 0002_sessions
Create Date: 2026-12-01
"""

import unicodedata
from collections import defaultdict

import sqlalchemy as sa
from alembic import op

from authapp.models import UTCDateTime

revision = "0003_security"
down_revision = "0002_sessions"
branch_labels = None
depends_on = None


def _canonical(address):
    # authapp.identifiers.canonical_email as of this revision (a migration keeps its own copy).
    text = unicodedata.normalize("NFKC", address.strip()).lower()
    return unicodedata.normalize("NFKC", text).lower()


def upgrade():
    # The per-account lockout: one guard row per counted account (locked while an attempt
    # is counted) and one row per attempt within the window.
    op.create_table(
        "login_guards",
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_login_guards"),
    )
    op.create_table(
        "login_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("attempted_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_login_attempts"),
    )
    op.create_index("ix_login_attempts_key_attempted_at", "login_attempts", ["key", "attempted_at"])

    # Email addresses: stored NFKC-normalised and lowercased, and looked up as stored (a
    # new unique index; the one on lower(email) stays). Addresses that share a canonical
    # form with another account's are left exactly as they are (never merged, never
    # renamed: `flask users email-collisions` lists them for an operator to settle);
    # every other address is rewritten to its canonical form. A rewrite the database
    # refuses all the same (its lower() folding a character Python's does not) leaves
    # that row as it is too: the upgrade never fails on existing rows.
    users = sa.table("users", sa.column("id", sa.Integer), sa.column("email", sa.String))
    connection = op.get_bind()
    groups = defaultdict(list)
    for user_id, email in connection.execute(sa.select(users.c.id, users.c.email)).all():
        groups[_canonical(email)].append((user_id, email))
    for form, members in groups.items():
        if len(members) == 1 and members[0][1] != form:
            try:
                with connection.begin_nested():
                    connection.execute(users.update().where(users.c.id == members[0][0]).values(email=form))
            except sa.exc.IntegrityError:
                pass
    op.create_index("ix_users_email", "users", ["email"], unique=True)


def downgrade():
    op.drop_index("ix_users_email", table_name="users")
    op.drop_index("ix_login_attempts_key_attempted_at", table_name="login_attempts")
    op.drop_table("login_attempts")
    op.drop_table("login_guards")
