"""email: verified addresses, one-time link tokens, the mail outbox

Revision ID: 0005_email
Revises: 0004_signing_keys
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from authapp.models import UTCDateTime

revision = "0005_email"
down_revision = "0004_signing_keys"
branch_labels = None
depends_on = None


def upgrade():
    # A plain ALTER TABLE ... ADD COLUMN on SQLite too (no copy of the table, see downgrade).
    op.add_column("users", sa.Column("email_verified_at", UTCDateTime(), nullable=True))
    op.create_table(
        "one_time_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=100), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_one_time_tokens_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_one_time_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_one_time_tokens_token_hash"),
    )
    op.create_index("ix_one_time_tokens_user_kind", "one_time_tokens", ["user_id", "kind"])
    op.create_table(
        "mail_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("recipient_key", sa.String(length=64), nullable=False),
        sa.Column("recipient", sa.String(length=255), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("body_text", sa.Text(), nullable=True),
        sa.Column("body_html", sa.Text(), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("give_up_at", UTCDateTime(), nullable=False),
        sa.Column("claimed_until", UTCDateTime(), nullable=True),
        sa.Column("claimed_by", sa.String(length=36), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_mail_outbox_user_id_users", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_mail_outbox"),
    )
    op.create_index("ix_mail_outbox_due", "mail_outbox", ["status", "next_attempt_at"])
    op.create_index("ix_mail_outbox_recipient", "mail_outbox", ["recipient_key", "kind", "created_at"])


def downgrade():
    op.drop_index("ix_mail_outbox_recipient", table_name="mail_outbox")
    op.drop_index("ix_mail_outbox_due", table_name="mail_outbox")
    op.drop_table("mail_outbox")
    op.drop_index("ix_one_time_tokens_user_kind", table_name="one_time_tokens")
    op.drop_table("one_time_tokens")
    # ALTER TABLE ... DROP COLUMN (SQLite has it since 3.35), never a batch copy: copying
    # drops the old table, which with foreign keys on deletes every session and refresh
    # token by cascade, and the copy loses the unique indexes on lower(email) and
    # lower(username), which SQLite cannot reflect.
    op.drop_column("users", "email_verified_at")
