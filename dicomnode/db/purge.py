"""Ended jobs that may be deleted, and deleting their rows.

The statements behind ``dicomnode jobs purge``; the use case (one transaction, the
audit entry, the result files after the commit) is
:func:`dicomnode.store.retention.purge_jobs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, selectinload

from dicomnode.db import commitment
from dicomnode.db.models import Delivery, Job, JobEvent, JobState, Output, Series

# Enough ids per statement to stay far below SQLite's and PostgreSQL's parameter limits.
_CHUNK = 500


@dataclass(frozen=True)
class Selection:
    """The ended jobs a purge deletes, and how many it keeps for their commitment."""

    jobs: list[Job]
    kept: int


def select_ended(session: Session, state: JobState, cutoff: datetime, *, lock: bool) -> Selection:
    """Return the jobs in ``state`` that ended before ``cutoff``, oldest id first.

    A job's end is ``finished_at`` (``updated_at`` for a row without one). A job with a
    delivery whose storage commitment is still awaited is left out, in any state: its
    delivery row is what keeps retention off its source series, and its results are
    what a commitment failure re-sends. Each job comes with its series and study
    loaded, so it can be described after the session has ended.

    Parameters
    ----------
    session : Session
        The session (a transaction when ``lock``).
    state : JobState
        An ended state.
    cutoff : datetime
        Jobs that ended before it.
    lock : bool
        Lock the rows, skipping locked ones: a job retried meanwhile (no longer ended)
        is not deleted, and a job an admin is acting on is left for the next purge.

    Returns
    -------
    Selection
        The jobs, and how many aged jobs were kept for an awaited commitment.
    """
    ended = func.coalesce(Job.finished_at, Job.updated_at)
    aged = select(Job).where(Job.state == state, ended < cutoff)
    waiting = select(Delivery.id).where(Delivery.job_id == Job.id, commitment.awaiting())
    query = (
        aged.where(~waiting.exists())
        .order_by(Job.id)
        .options(selectinload(Job.series).selectinload(Series.study))
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    jobs = list(session.scalars(query))
    kept = session.scalar(select(func.count()).select_from(aged.where(waiting.exists()).subquery()))
    return Selection(jobs, int(kept or 0))


def result_files(session: Session, job_ids: list[int]) -> list[str]:
    """Return the result files of these jobs that no other job's output names.

    Parameters
    ----------
    session : Session
        The session.
    job_ids : list[int]
        The jobs.

    Returns
    -------
    list[str]
        Spool-relative paths, sorted.
    """
    paths: set[str] = set()
    for start in range(0, len(job_ids), _CHUNK):
        chunk = job_ids[start : start + _CHUNK]
        paths.update(session.scalars(select(Output.path).where(Output.job_id.in_(chunk))))
    if not paths:
        return []
    # A re-run of identical input makes identical objects, at the same path.
    purged, shared = set(job_ids), set[str]()
    ordered = sorted(paths)
    for start in range(0, len(ordered), _CHUNK):
        rows = session.execute(
            select(Output.path, Output.job_id).where(
                Output.path.in_(ordered[start : start + _CHUNK])
            )
        )
        shared.update(path for path, job_id in rows if job_id not in purged)
    return sorted(paths - shared)


def delete_jobs(session: Session, job_ids: list[int]) -> None:
    """Delete jobs with their history, output and delivery rows.

    Parameters
    ----------
    session : Session
        An open transaction.
    job_ids : list[int]
        The jobs.
    """
    for start in range(0, len(job_ids), _CHUNK):
        chunk = job_ids[start : start + _CHUNK]
        for child in (JobEvent, Output, Delivery):
            session.execute(delete(child).where(child.job_id.in_(chunk)))
        session.execute(delete(Job).where(Job.id.in_(chunk)))
