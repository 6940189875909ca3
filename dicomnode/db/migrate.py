"""Run and inspect Alembic migrations from code (``dicomnode db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from alembic import command
from dicomnode.errors import DicomnodeError

_PACKAGE = Path(__file__).resolve().parent.parent


def script_location() -> Path:
    """Return the folder holding ``env.py`` and ``versions/``.

    Returns
    -------
    Path
        The ``alembic/`` folder of a source checkout, or the copy inside an installed wheel.

    Raises
    ------
    DicomnodeError
        If neither exists (a broken install).
    """
    for candidate in (_PACKAGE.parent / "alembic", _PACKAGE / "_data" / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise DicomnodeError("alembic migrations not found next to the dicomnode package")


def _config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["url"] = engine.url.render_as_string(hide_password=False)
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision``.

    Parameters
    ----------
    engine : Engine
        The database to migrate.
    revision : str
        Target revision; the newest by default.
    """
    cfg = _config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """Return the revision the database is at, or None for an empty database.

    Parameters
    ----------
    engine : Engine
        The database.

    Returns
    -------
    str or None
        The current revision.
    """
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """Return the newest revision the code knows.

    Returns
    -------
    str
        The head revision id.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None, "no migrations found"
    return head


def require_current(engine: Engine) -> None:
    """Refuse to run on a database that is not at the head revision.

    Parameters
    ----------
    engine : Engine
        The database.

    Raises
    ------
    DicomnodeError
        With the command that fixes it.
    """
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise DicomnodeError(
            f"database is at revision {current or 'none (empty)'}, the code needs {head}: "
            "run `dicomnode db upgrade`"
        )
