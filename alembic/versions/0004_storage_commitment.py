"""deliveries: storage commitment (transaction UID, requested, confirmed, failed) and warnings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from dicomnode.db.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot add a unique constraint to an existing table.
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("warning", sa.Text(), nullable=True))
        batch.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("commitment_requested_at", UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("confirmed_at", UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("commitment_failed", sa.Text(), nullable=True))
        batch.create_unique_constraint(
            op.f("uq_deliveries_commitment_uid"), ["commitment_uid"]
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint(op.f("uq_deliveries_commitment_uid"), type_="unique")
        batch.drop_column("commitment_failed")
        batch.drop_column("confirmed_at")
        batch.drop_column("commitment_requested_at")
        batch.drop_column("commitment_uid")
        batch.drop_column("warning")
