"""The audit trail: append one entry per thing that happened, export them later.

Events (the ``event`` column), loosely after the DICOM audit messages of PS3.15
A.5.3 ("DICOM Instances Transferred" is one message per study per association; we
keep one per series, which the CLI can group):

=============================  =============================================================
``instances-received``         one per series per association: calling AE, address, count,
                               bytes; written when the association ends
``instances-refused``          one per association with refusals: how many, the first reason
``association-rejected``       peers we refused, one entry per address per minute at most:
                               how many, the AE titles tried (escaped, bounded), and why
``commitment-report-refused``  Storage Commitment reports not from the destination asked
                               (AE title and address); one per address per minute at most
``instances-imported``         ``dicomnode import``: per series, who ran it
``job-queued``                 a job was created for a series
``job-ended``                  a job ended: done, failed or cancelled (the ``outcome``)
``results-sent``               one delivery of a job's results to a destination
``results-resent``             ``dicomnode send``: objects sent by hand
``instances-deleted``          retention deleted a series' instances (and why)
``admin``                      an admin command changed something: retry, cancel, purge
``audit-pruned``               ``dicomnode audit prune`` deleted entries before a date, once
                               checked against an export (named, with its SHA-256)
=============================  =============================================================

Entries never carry patient data: AE titles, addresses, UIDs, job ids, counts and
one-line details written by dicomnode itself.

The table is append-only, enforced by the database (triggers refuse UPDATE, DELETE
and TRUNCATE), with one exception: :func:`prune`, behind ``dicomnode audit prune``,
deletes the entries before a date once :func:`check_export` has found every one of
them, unchanged, in an export, and records itself as an ``audit-pruned`` entry (with
the export's name and SHA-256) in the same transaction. What a hospital's auditors
then hold is an unbroken chain: the archived exports, and in the table the entries
since, beginning with the prune that names the archive.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.engine import transaction
from dicomnode.db.events import EVENTS
from dicomnode.db.models import AuditEvent, utcnow
from dicomnode.errors import DicomnodeError, ExportMismatch

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Entry:
    """One entry of the trail, as read back: the fields of :data:`FIELDS`, in that order."""

    id: int
    at: datetime
    event: str
    actor: str | None
    peer: str | None
    study_uid: str | None
    series_uid: str | None
    job_id: int | None
    destination: str | None
    count: int | None
    size_bytes: int | None
    outcome: str
    detail: str | None


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


# The PostgreSQL setting the append-only trigger reads (migration 0006): a DELETE of
# an entry older than it passes, in the transaction that set it (SET LOCAL) only.
PRUNE_SETTING = "dicomnode.audit_prune_before"
# The SQLite trigger the prune lifts inside its own transaction (migration 0005).
_SQLITE_DELETE_TRIGGER = "audit_events_no_delete"


@dataclass(frozen=True)
class CheckedExport:
    """The entries before a cutoff, each found unchanged in an export."""

    before: datetime
    count: int
    first_id: int | None
    last_id: int | None


def export_value(value: Any) -> Any:
    """Return a column's value as ``audit export`` writes it: a timestamp in ISO 8601.

    The one rule that :func:`export_text` compares by, so that the writer and the
    check of a prune cannot disagree on how a time is spelt.

    Parameters
    ----------
    value : Any
        A column's value.

    Returns
    -------
    Any
        ISO 8601 text for a datetime, else the value itself (JSON keeps numbers and null).
    """
    return value.isoformat() if isinstance(value, datetime) else value


def export_text(value: Any) -> str:
    """Return a value as an export shows it, for comparing a stored entry with one exported.

    CSV has only text, and JSON has numbers and null: both compare as this text.

    Parameters
    ----------
    value : Any
        A column's value, or a cell read back from an export.

    Returns
    -------
    str
        ``""`` for None, ISO 8601 for a timestamp, else ``str``.
    """
    return "" if value is None else str(export_value(value))


def check_export(
    session: Session, exported: Iterable[dict[str, Any]], before: datetime
) -> CheckedExport:
    """Check that every entry before ``before`` is in ``exported``, field for field.

    Both are read oldest first (by id), side by side, so that a year of entries is
    checked without holding either in memory; the export may hold more (entries after
    the cutoff, or an export of everything), never less.

    Parameters
    ----------
    session : Session
        A read-only session.
    exported : Iterable[dict[str, Any]]
        The export's entries in its order, as mappings of :data:`FIELDS`.
    before : datetime
        The cutoff: entries with ``at`` before it.

    Returns
    -------
    CheckedExport
        How many entries, and their ids.

    Raises
    ------
    ExportMismatch
        Naming the first entry missing from the export or different in it.
    """
    rows = iter(exported)
    row: dict[str, Any] = {}
    last_exported = 0
    count, first_id, last_id = 0, None, None
    for entry in entries(session, until=before):
        while last_exported < entry["id"]:
            found = next(rows, None)
            if found is None:
                raise ExportMismatch(f"entry {entry['id']} ({entry['event']}) is not in the export")
            row = found
            raw: Any = row.get("id")
            try:
                row_id = int(raw)
            except (TypeError, ValueError):
                row_id = 0  # missing, blank or not a number
            # A blank id is no id: not to be reported as an entry out of order.
            if row_id < 1:  # ids start at 1
                raise ExportMismatch("the export has an entry without a valid id")
            if row_id <= last_exported:
                raise ExportMismatch("the export is not in id order, as audit export writes it")
            last_exported = row_id
        if last_exported != entry["id"]:
            raise ExportMismatch(f"entry {entry['id']} ({entry['event']}) is not in the export")
        for name in FIELDS:
            if export_text(entry[name]) != export_text(row.get(name)):
                raise ExportMismatch(f"entry {entry['id']} differs in the export ({name})")
        count += 1
        first_id = entry["id"] if first_id is None else first_id
        last_id = entry["id"]
    return CheckedExport(before=before, count=count, first_id=first_id, last_id=last_id)


def prune(sessions: sessionmaker[Session], checked: CheckedExport, actor: str, archive: str) -> int:
    """Delete the entries an export was checked to hold, and record that in the trail.

    One transaction: the entries go and the ``audit-pruned`` entry that names the
    export comes, or neither. The append-only trigger is lifted for this transaction
    only: on PostgreSQL by the setting it reads (entries before the cutoff only); on
    SQLite, which has no such setting, the DELETE trigger is dropped and created again
    from its own stored SQL before the commit, so that no other connection ever sees
    the table without it.

    Parameters
    ----------
    sessions : sessionmaker[Session]
        Database sessions.
    checked : CheckedExport
        What :func:`check_export` found.
    actor : str
        Who prunes (:func:`admin_actor`).
    archive : str
        The export: its path and SHA-256, for the entry.

    Returns
    -------
    int
        How many entries were deleted.

    Raises
    ------
    ExportMismatch
        If entries before the cutoff were added since the check (nothing is deleted).
    DicomnodeError
        If the SQLite trigger is missing: a trail that is not protected is not pruned.
    """
    if not checked.count or checked.last_id is None:
        return 0
    doomed = delete(AuditEvent).where(
        AuditEvent.at < checked.before, AuditEvent.id <= checked.last_id
    )
    with transaction(sessions) as session:
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            session.execute(
                text("SELECT set_config(:name, :value, true)"),
                {"name": PRUNE_SETTING, "value": checked.before.isoformat()},
            )
            deleted = cast(CursorResult[Any], session.execute(doomed)).rowcount
        else:
            trigger = session.scalar(
                text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = :name"),
                {"name": _SQLITE_DELETE_TRIGGER},
            )
            if not trigger:
                raise DicomnodeError(
                    f"audit_events has no {_SQLITE_DELETE_TRIGGER} trigger: the trail is not "
                    "append-only; not pruning (see `dicomnode db upgrade`)"
                )
            connection.exec_driver_sql(f"DROP TRIGGER {_SQLITE_DELETE_TRIGGER}")
            deleted = cast(CursorResult[Any], session.execute(doomed)).rowcount
            connection.exec_driver_sql(str(trigger))
        # Entries cannot change or go, so only an entry added since the check, with an
        # id among those checked, makes the count differ: it is in no export.
        if deleted != checked.count:
            raise ExportMismatch(
                f"{deleted} entries before the cutoff now, {checked.count} when the export "
                "was checked: some were added since; nothing deleted, export again"
            )
        record(
            session,
            "audit-pruned",
            actor=actor,
            count=deleted,
            detail=f"entries before {checked.before.isoformat()} deleted (ids "
            f"{checked.first_id}..{checked.last_id}), each found unchanged in {archive}",
        )
    log.info(
        "audit prune: %d entries before %s deleted (ids %d..%d)",
        deleted,
        checked.before.isoformat(),
        checked.first_id,
        checked.last_id,
    )
    return int(deleted)
