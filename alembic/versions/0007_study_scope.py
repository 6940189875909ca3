"""Study scope and priors: study completion, the series chosen, prior series and studies

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "studies", sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index("ix_studies_pending_since", "studies", ["pending_since"])
    op.add_column("studies", sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "studies", sa.Column("generation", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column("studies", sa.Column("selections", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("selection", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("priors", sa.JSON(), nullable=True))
    op.add_column(
        "series", sa.Column("prior", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35 and later have it), not batch mode: batch mode
    # copies and drops the table, and the series' foreign keys refuse that for studies.
    op.drop_column("series", "prior")
    op.drop_column("jobs", "priors")
    op.drop_column("jobs", "selection")
    op.drop_index("ix_studies_pending_since", table_name="studies")
    for column in ("selections", "generation", "completed_at", "pending_since"):
        op.drop_column("studies", column)
