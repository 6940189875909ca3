from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from dicomnode.db import migrate
from dicomnode.db.models import Base


def test_upgrade_head_matches_the_models(engine) -> None:
    # `engine` is already migrated to head by the fixture, on SQLite and PostgreSQL.
    assert migrate.current_revision(engine) == migrate.head_revision()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"


def test_upgrade_is_repeatable(engine) -> None:
    migrate.upgrade(engine)
    migrate.require_current(engine)
