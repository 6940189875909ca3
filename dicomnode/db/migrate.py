"""Run and inspect Alembic migrations from code (``dicomnode db upgrade``).

Alembic itself is imported only to migrate: the check every read-only CLI command
makes (:func:`require_current`) reads ``alembic_version`` with one query and the
newest revision from the migration files' text, which keeps a tenth of a second or
more of Alembic's import time out of ``dicomnode status`` and ``jobs list``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, inspect, text

from dicomnode.db.engine import make_engine
from dicomnode.errors import DicomnodeError

if TYPE_CHECKING:
    from alembic.config import Config

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
    from alembic.config import Config

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
    from alembic import command

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
    # What alembic's MigrationContext.get_current_revision() reads, without alembic.
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        revisions = conn.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    if len(revisions) > 1:
        raise DicomnodeError(f"database has several heads: {', '.join(sorted(revisions))}")
    return revisions[0] if revisions else None


def head_revision() -> str:
    """Return the newest revision the code knows.

    Returns
    -------
    str
        The head revision id.
    """
    return _head(script_location())


VERSION_TABLE = "alembic_version"  # alembic's default: env.py does not change it
_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*[\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(None|[\"']([^\"']+)[\"'])", re.MULTILINE)


@cache
def _head(location: Path) -> str:
    # The revision no other revision names as its down_revision. Our migrations are one
    # straight line with plain string ids (tests/unit/db checks this equals alembic's
    # own answer), so reading the assignments is enough and needs no import of them.
    revisions: set[str] = set()
    parents: set[str] = set()
    for file in (location / "versions").glob("*.py"):
        source = file.read_text(encoding="utf-8")
        revision, down = _REVISION.search(source), _DOWN.search(source)
        if revision is None or down is None:
            raise DicomnodeError(f"{file.name}: no revision / down_revision assignment")
        revisions.add(revision.group(1))
        if down.group(2):
            parents.add(down.group(2))
    heads = revisions - parents
    if len(heads) != 1:
        raise DicomnodeError(f"migrations have {len(heads)} heads: {', '.join(sorted(heads))}")
    return heads.pop()


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


def open_current(url: str, **kwargs: Any) -> Engine:
    """Return an engine on an existing database that is at the newest migration.

    What every command but ``db upgrade`` opens: it never creates a database (a
    missing SQLite file would otherwise become an empty one) and never runs on an
    old schema, whose answers would be wrong.

    Parameters
    ----------
    url : str
        The database URL.
    **kwargs
        Passed on to :func:`~dicomnode.db.engine.make_engine` (``connect_args``).

    Returns
    -------
    Engine
        The engine; the caller disposes of it.

    Raises
    ------
    DatabaseNotFound
        If the SQLite file does not exist.
    DicomnodeError
        If the schema is not at the newest migration.
    """
    engine = make_engine(url, create=False, **kwargs)
    try:
        require_current(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
