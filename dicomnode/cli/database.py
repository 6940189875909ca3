"""The node's database for the CLI: opened for one command, or made current (``db upgrade``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from dicomnode.config import Settings

if TYPE_CHECKING:
    from dicomnode.db import Engine, Session

P = ParamSpec("P")
T = TypeVar("T")

# SQLAlchemy and the database layer are imported when a command opens the database,
# not when the parser is built: `dicomnode --help` should not pay for them.


def open_database(settings: Settings) -> Engine:
    """Return an engine on the node's existing database, at the newest migration.

    Commands other than ``db upgrade`` and the node itself never create a database:
    a missing SQLite file raises :class:`~dicomnode.errors.DatabaseNotFound`, which
    ``main`` turns into one line saying how to point at the right configuration.

    Parameters
    ----------
    settings : Settings
        The database URL.

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
    from dicomnode.db import migrate

    return migrate.open_current(settings.database.url)


def read(
    settings: Settings,
    query: Callable[Concatenate[Session, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Open the database, run one read in a read-only session, close it, return the result.

    The query (one of :mod:`dicomnode.db.queries`, :mod:`dicomnode.db.studies`,
    :mod:`dicomnode.db.health`) returns plain values: the command prints them after
    the database is closed, and never holds a session or a row itself.

    Parameters
    ----------
    settings : Settings
        The database URL.
    query : Callable
        ``query(session, *args, **kwargs)``.
    *args, **kwargs
        Passed on to ``query``.

    Returns
    -------
    T
        What ``query`` returned.

    Raises
    ------
    DatabaseNotFound
        If the SQLite file does not exist.
    DicomnodeError
        If the schema is not at the newest migration.
    """
    from dicomnode.db import engine as db

    engine = open_database(settings)
    try:
        return db.read(engine, query, *args, **kwargs)
    finally:
        engine.dispose()


def db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode db upgrade``: create the database or migrate it to the newest.

    Parameters
    ----------
    settings : Settings
        The database URL.
    args : argparse.Namespace
        Unused.

    Returns
    -------
    int
        0; a failure raises.
    """
    from dicomnode.db import make_engine, migrate

    engine = make_engine(settings.database.url)  # the one command that creates it
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    print(f"database at revision {after} (was {before or 'empty'})")
    return 0
