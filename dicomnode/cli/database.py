"""Opening the node's database for one CLI command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from dicomnode.config import Settings

if TYPE_CHECKING:
    from dicomnode.db.engine import Engine

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
    from dicomnode.db.engine import make_engine

    engine = make_engine(settings.database.url, create=False)
    try:
        migrate.require_current(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def with_session(fn: Callable[..., int]) -> Callable[[Settings, argparse.Namespace], int]:
    """Wrap ``fn(session, args)`` into a command that opens and closes the database.

    The schema must be at the newest migration: a command reading an old schema
    would print wrong answers, so it stops with a one-line error instead. The session
    only reads (:func:`~dicomnode.db.engine.read_only`): a listing never holds up the
    listener.

    Parameters
    ----------
    fn : Callable[..., int]
        ``fn(session, args) -> exit code``.

    Returns
    -------
    Callable[[Settings, argparse.Namespace], int]
        ``run(settings, args) -> exit code``, as ``set_defaults(run=...)`` expects.
    """

    def run(settings: Settings, args: argparse.Namespace) -> int:
        from dicomnode.db.engine import read_only, session_factory

        engine = open_database(settings)
        try:
            with read_only(session_factory(engine))() as session:
                return fn(session, args)
        finally:
            engine.dispose()

    # It reads rows, never DICOM: main() then starts without pydicom (see Command).
    setattr(run, "reads_dicom", False)  # noqa: B010 - a function attribute mypy knows not
    return run
