"""signing_keys: key pairs for RS256, ES256 and EdDSA tokens, private parts encrypted

Revision ID: 0004_signing_keys
Revises: 0003_security
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from authapp.models import UTCDateTime

revision = "0004_signing_keys"
down_revision = "0003_security"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("public_jwk", sa.Text(), nullable=False),
        sa.Column("private_key_sealed", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("activated_at", UTCDateTime(), nullable=True),
        sa.Column("deactivated_at", UTCDateTime(), nullable=True),
        sa.Column("retired_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("kid", name="pk_signing_keys"),
        sa.CheckConstraint("state IN ('standby', 'active', 'retired')", name="ck_signing_keys_state"),
    )
    # Exactly one key signs: the database refuses a second active row.
    op.create_index(
        "uq_signing_keys_one_active",
        "signing_keys",
        ["state"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )


def downgrade():
    op.drop_index("uq_signing_keys_one_active", table_name="signing_keys")
    op.drop_table("signing_keys")
