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


def test_the_audit_migration_goes_down_and_up_with_data(engine, sessions) -> None:
    from sqlalchemy import text

    from alembic import command
    from dicomnode.db import Series, Study, transaction

    with transaction(sessions) as s:
        study = Study(study_uid="1.2.3")
        s.add(study)
        s.flush()
        s.add(Series(study_id=study.id, series_uid="1.2.3.4"))
    command.downgrade(migrate._config(engine), "0004")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM series")).scalar() == 1
    migrate.upgrade(engine)
    migrate.require_current(engine)
