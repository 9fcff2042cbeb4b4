"""mfa: TOTP factors, recovery codes, each session's assurance level

Revision ID: 0006_mfa
Revises: 0005_email
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from authapp.models import UTCDateTime

revision = "0006_mfa"
down_revision = "0005_email"
branch_labels = None
depends_on = None


def upgrade():
    # The sessions that exist already were all started with a password alone. A plain
    # ALTER TABLE ... ADD COLUMN on SQLite too (no copy of the table, see downgrade).
    op.add_column("sessions", sa.Column("aal", sa.String(length=8), nullable=False, server_default="aal1"))
    op.add_column("sessions", sa.Column("amr", sa.String(length=32), nullable=False, server_default="pwd"))
    op.create_table(
        "mfa_totp",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("secret_sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("enabled_at", UTCDateTime(), nullable=True),
        sa.Column("last_used_step", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_mfa_totp_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", name="pk_mfa_totp"),
    )
    op.create_table(
        "mfa_recovery_codes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_mfa_recovery_codes_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mfa_recovery_codes"),
    )
    op.create_index("uq_mfa_recovery_codes_user_code", "mfa_recovery_codes", ["user_id", "code_hash"], unique=True)


def downgrade():
    op.drop_index("uq_mfa_recovery_codes_user_code", table_name="mfa_recovery_codes")
    op.drop_table("mfa_recovery_codes")
    op.drop_table("mfa_totp")
    # ALTER TABLE ... DROP COLUMN (SQLite has it since 3.35), never a batch copy: copying
    # drops the old table, and with foreign keys on that deletes every refresh token.
    op.drop_column("sessions", "amr")
    op.drop_column("sessions", "aal")
