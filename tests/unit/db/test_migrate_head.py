"""``require_current`` reads the newest revision without alembic: it must agree with it."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from dicomnode.db import migrate


def test_head_from_the_files_is_alembics_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrate.script_location()))
    assert migrate.head_revision() == ScriptDirectory.from_config(cfg).get_current_head()


def test_current_revision_without_alembic(engine) -> None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        expected = MigrationContext.configure(conn).get_current_revision()
    assert migrate.current_revision(engine) == expected == migrate.head_revision()
    migrate.require_current(engine)
