"""Opening the node's database for one CLI command."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dicomnode.config import Settings
from dicomnode.db import migrate
from dicomnode.db.engine import make_engine, read_only, session_factory


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
        engine = make_engine(settings.database.url)
        try:
            migrate.require_current(engine)
            with read_only(session_factory(engine))() as session:
                return fn(session, args)
        finally:
            engine.dispose()

    return run
