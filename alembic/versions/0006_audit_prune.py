"""audit_events: on PostgreSQL the append-only trigger lets `dicomnode audit prune` delete

Entries older than the cutoff the prune declares for its own transaction (SET LOCAL
dicomnode.audit_prune_before), and only those; UPDATE and TRUNCATE are refused as
before, and so is any DELETE outside such a transaction. SQLite has no transaction
variables: its triggers stay as they are, and the prune lifts the DELETE trigger
inside its own transaction (see dicomnode.db.audit.prune), which no other
connection can see.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MESSAGE = "audit_events is append-only"
# dicomnode.db.audit.PRUNE_SETTING; spelled out so that this migration never changes.
SETTING = "dicomnode.audit_prune_before"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # The same function serves the row trigger (UPDATE, DELETE) and the statement
    # trigger (TRUNCATE); only a DELETE of a row older than the declared cutoff passes.
    op.execute(
        "CREATE OR REPLACE FUNCTION dicomnode_audit_append_only() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ DECLARE cutoff text; BEGIN "
        "IF TG_OP = 'DELETE' THEN "
        f"cutoff := current_setting('{SETTING}', true); "
        "IF cutoff IS NOT NULL AND cutoff <> '' AND OLD.at < CAST(cutoff AS timestamptz) "
        "THEN RETURN OLD; END IF; "
        "END IF; "
        f"RAISE EXCEPTION '{MESSAGE}'; END $$"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE OR REPLACE FUNCTION dicomnode_audit_append_only() RETURNS trigger "
        f"LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{MESSAGE}'; END $$"
    )
