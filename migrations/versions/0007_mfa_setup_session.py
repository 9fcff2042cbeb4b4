"""mfa_setup_session: the session that set a pending TOTP factor up

Revision ID: 0007_mfa_setup_session
Revises: 0006_mfa
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_mfa_setup_session"
down_revision = "0006_mfa"
branch_labels = None
depends_on = None


def upgrade():
    # A pending factor set up before this column existed has none, and cannot be enabled:
    # its user starts the setup again. A plain ALTER TABLE on SQLite too (no table copy).
    op.add_column("mfa_totp", sa.Column("setup_session_id", sa.String(length=36), nullable=True))


def downgrade():
    op.drop_column("mfa_totp", "setup_session_id")
