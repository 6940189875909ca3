"""The audit trail: append one entry per thing that happened, export them later.

Events (the ``event`` column), loosely after the DICOM audit messages of PS3.15
A.5.3 ("DICOM Instances Transferred" is one message per study per association; we
keep one per series, which the CLI can group):

=======================  ===========================================================
``instances-received``   one per series per association: calling AE, address, count,
                         bytes; written when the association ends
``instances-refused``    one per association with refusals: how many, the first reason
``association-rejected`` a peer we refused: its AE titles and address, and why
``instances-imported``   ``dicomnode import``: per series, who ran it
``job-queued``           a job was created for a series
``job-ended``            a job ended: done, failed or cancelled (the ``outcome``)
``results-sent``         one delivery of a job's results to a destination
``results-resent``       ``dicomnode send``: objects sent by hand
``instances-deleted``    retention deleted a series' instances (and why)
``admin``                an admin command changed something: retry, cancel, purge
=======================  ===========================================================

Entries never carry patient data: AE titles, addresses, UIDs, job ids, counts and
one-line details written by dicomnode itself.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import AuditEvent, utcnow

log = logging.getLogger(__name__)

EVENTS = (
    "instances-received",
    "instances-refused",
    "association-rejected",
    "instances-imported",
    "job-queued",
    "job-ended",
    "results-sent",
    "results-resent",
    "instances-deleted",
    "admin",
)
FIELDS = (
    "id",
    "at",
    "event",
    "actor",
    "peer",
    "study_uid",
    "series_uid",
    "job_id",
    "destination",
    "count",
    "size_bytes",
    "outcome",
    "detail",
)


def admin_actor() -> str:
    """Name the person running an admin command: ``admin user@host``.

    Returns
    -------
    str
        The login name (or the uid, in a container without a passwd entry) and host.
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"admin {user}@{socket.gethostname()}"


def record(session: Session, event: str, *, outcome: str = "success", **values: Any) -> None:
    """Append one entry, inside the caller's transaction.

    Written in the transaction that makes the change it reports, so that the trail
    and the tables cannot disagree: the entry commits with the change or not at all.

    Parameters
    ----------
    session : Session
        The open transaction.
    event : str
        One of :data:`EVENTS`.
    outcome : str
        ``success``, ``failure``, ``warning``, or a job's final state.
    **values : Any
        Columns of :class:`~dicomnode.db.models.AuditEvent`: ``actor``, ``peer``,
        ``study_uid``, ``series_uid``, ``job_id``, ``destination``, ``count``,
        ``size_bytes``, ``detail``, ``at``.

    Raises
    ------
    ValueError
        For an unknown event name (a bug: the set is closed).
    """
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    if values.get("at") is None:
        values["at"] = utcnow()
    if values.get("detail") is not None:
        values["detail"] = " ".join(str(values["detail"]).split())[:2000]
    for key, length in (("actor", 128), ("peer", 300), ("destination", 64)):
        if values.get(key) is not None:
            values[key] = str(values[key])[:length]
    session.add(AuditEvent(event=event, outcome=outcome, **values))


def entries(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    events: tuple[str, ...] = (),
    study_uid: str | None = None,
    job_id: int | None = None,
    batch: int = 1000,
) -> Iterator[dict[str, Any]]:
    """Yield entries oldest first, as mappings of :data:`FIELDS`.

    Parameters
    ----------
    session : Session
        A session; from :func:`dicomnode.db.engine.read_only` for an export, so that
        a long one (or one paused in a pager) never holds SQLite's write lock.
    since, until : datetime, optional
        Only entries at or after ``since`` and before ``until``.
    events : tuple[str, ...]
        Only these events (all when empty).
    study_uid : str, optional
        Only entries about this study.
    job_id : int, optional
        Only entries about this job.
    batch : int
        Rows fetched per query, so that a year of entries never sits in memory.

    Yields
    ------
    dict[str, Any]
        One entry.
    """
    columns = [getattr(AuditEvent, name) for name in FIELDS]
    last = 0
    while True:
        # Plain rows, not ORM objects: an export of a year's trail is read once, in order.
        query = select(*columns).where(AuditEvent.id > last).order_by(AuditEvent.id)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if until is not None:
            query = query.where(AuditEvent.at < until)
        if events:
            query = query.where(AuditEvent.event.in_(events))
        if study_uid is not None:
            query = query.where(AuditEvent.study_uid == study_uid)
        if job_id is not None:
            query = query.where(AuditEvent.job_id == job_id)
        rows = session.execute(query.limit(batch)).all()
        # Each batch in a transaction of its own, as READ COMMITTED gives on PostgreSQL:
        # SQLite's snapshot would otherwise hide what was written while the export ran.
        session.rollback()
        if not rows:
            return
        for row in rows:
            yield dict(zip(FIELDS, row, strict=True))
        last = rows[-1][0]
