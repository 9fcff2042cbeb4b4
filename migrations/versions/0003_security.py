"""security: login attempts counted in the database, email addresses in one canonical form

Revision ID: 0003_security
Revises: 0002_sessions
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from authapp.models import UTCDateTime

revision = "0003_security"
down_revision = "0002_sessions"
branch_labels = None
depends_on = None


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


def downgrade():
    op.drop_index("ix_login_attempts_key_attempted_at", table_name="login_attempts")
    op.drop_table("login_attempts")
    op.drop_table("login_guards")
