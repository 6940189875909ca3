"""Files a crash left in the spool without a database row.

A store renames the file into ``incoming/`` and then commits its row; a crash
between the two leaves a complete file that was never acknowledged. The sender
resends it (under a new file name), so such a file is only wasted space, but an
administrator must be able to trust that ``incoming/`` holds exactly what the
database lists. This sweep removes those files once they are old enough that no
store can still be on its way to committing them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Instance, Output, Series
from dicomnode.store.spool import INCOMING, RESULTS, Spool

log = logging.getLogger(__name__)

# A store commits its row milliseconds after the rename, and gives up within the
# database's busy timeout (30 s); ten minutes leaves a wide margin.
ORPHAN_AGE_SECONDS = 600


def remove_orphans(
    spool: Spool,
    sessions: sessionmaker[Session],
    older_than: float = ORPHAN_AGE_SECONDS,
    now: float | None = None,
) -> int:
    """Delete files under ``incoming/`` and ``results/`` that no row points at.

    ``results/`` gets the same care: a job writes its objects before it commits their
    rows, and a purge or retention interrupted between its commit and its deletes
    leaves files no row names.

    Parameters
    ----------
    spool : Spool
        The spool.
    sessions : sessionmaker[Session]
        Database sessions.
    older_than : float
        Only files renamed into place at least this many seconds ago go (the rename
        sets the change time; the modification time is the last byte received).
    now : float, optional
        The current time (for tests); the clock otherwise.

    Returns
    -------
    int
        How many files were removed.
    """
    cutoff = (time.time() if now is None else now) - older_than
    removed = 0
    for area, known_paths in ((INCOMING, _instance_paths), (RESULTS, _output_paths)):
        root = spool.root / area
        for study in _folders(root):
            for series in _folders(study):
                with sessions() as session:
                    known = known_paths(session, series.name)
                for path in series.glob("*.dcm"):
                    relative = path.relative_to(spool.root).as_posix()
                    try:
                        if relative not in known and path.stat().st_ctime < cutoff:
                            path.unlink()
                            removed += 1
                    except FileNotFoundError:
                        continue  # replaced by a resend, or deleted by retention, meanwhile
    if removed:
        log.info("removed %d files no row names, left by an interrupted store", removed)
    return removed


def _folders(path: Path) -> list[Path]:
    # Retention may remove an emptied folder while we look: that is no error.
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _instance_paths(session: Session, series_uid: str) -> set[str]:
    return set(
        session.scalars(
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.series_uid == series_uid)
        )
    )


def _output_paths(session: Session, series_uid: str) -> set[str]:
    return set(session.scalars(select(Output.path).where(Output.series_uid == series_uid)))
