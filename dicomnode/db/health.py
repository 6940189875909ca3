"""The queries behind ``dicomnode status`` and ``destinations list``.

Queue, deliveries, workers, recent errors, per-destination counts: read-only, and
returned as frozen views of plain values. :mod:`dicomnode.health` adds the listener
check and the disk, and judges what needs attention. Nothing here returns patient
data: job errors and event notes carry none by design.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, exists, func, make_url, or_, select, text
from sqlalchemy.orm import Session, aliased

from dicomnode.db.engine import database_now, read
from dicomnode.db.models import Delivery, DeliveryState, Job, JobEvent, JobState
from dicomnode.errors import first_line

LAST_ERRORS = 5
RECENT_FAILURES = timedelta(hours=1)
STALLED_AFTER = timedelta(minutes=10)
FAILED_DELIVERIES = timedelta(days=1)
# Notes of a job going back to the queue that are not errors: a worker that stops
# gives its job back, and a route waiting for another model's verdict postpones it.
_NOT_ERRORS = ("released:", "waiting for ")


@dataclass(frozen=True)
class FailedAttempt:
    """A failed attempt that is still a problem; the fields are ``status --json``'s."""

    job_id: int
    model: str
    at: datetime
    outcome: str  # the state it ended in: failed, or queued for a retry
    error: str  # the first line of its error


@dataclass(frozen=True)
class FailingDestination:
    """A destination whose latest delivery attempts failed; ``status --json``'s fields."""

    destination: str
    deliveries: int  # how many are failing
    since: datetime  # the oldest failing attempt
    last_failed_at: datetime
    error: str  # the first line of the newest error


@dataclass(frozen=True)
class QueuedJob:
    """The job that has waited longest in the queue; ``status --json``'s fields."""

    job_id: int
    created_at: datetime
    age_s: float  # by the database's clock, to a tenth of a second


@dataclass(frozen=True)
class Snapshot:
    """The queue and delivery figures of ``dicomnode status``."""

    now: datetime  # the database's clock, which the figures were taken by
    busy: tuple[str, ...]  # lease owners of running jobs, sorted
    queue: tuple[tuple[str, int], ...]  # (job state, count) for every state
    oldest_queued: QueuedJob | None
    deliveries: tuple[tuple[str, int], ...]  # (state, count): pending, then failed
    failed_last_hour: int
    stalled: int  # runnable for STALLED_AFTER and not claimed
    deliveries_failed_last_day: int
    failing_destinations: tuple[FailingDestination, ...]
    last_errors: tuple[FailedAttempt, ...]


@dataclass(frozen=True)
class DeliveryCounts:
    """Deliveries to one destination; the fields are ``destinations list --json``'s."""

    sent: int = 0
    pending: int = 0
    failed: int = 0
    last_sent_at: datetime | None = None
    last_error: str | None = None  # the first line of the newest error


def last_errors(session: Session, limit: int = LAST_ERRORS) -> tuple[FailedAttempt, ...]:
    """Return the latest failed attempts that are still problems, newest first.

    An attempt failed when it ended in ``failed``, or back in the queue with an error.
    It stops being a problem once the job's results reached every destination after it:
    a PACS that was down and took the results on the next try leaves no error behind.

    Parameters
    ----------
    session : Session
        Database session.
    limit : int
        At most this many.

    Returns
    -------
    tuple[FailedAttempt, ...]
        The attempts.
    """
    attempted = (JobState.RUNNING.value, JobState.SENDING.value)
    unsent = exists().where(
        Delivery.job_id == JobEvent.job_id,
        or_(
            Delivery.state != DeliveryState.SENT,
            Delivery.sent_at.is_(None),
            Delivery.sent_at <= JobEvent.at,
        ),
    )
    delivered_later = and_(exists().where(Delivery.job_id == JobEvent.job_id), ~unsent)
    query = (
        select(JobEvent.job_id, Job.model, JobEvent.at, JobEvent.to_state, JobEvent.note)
        .join(Job, Job.id == JobEvent.job_id)
        .where(
            JobEvent.note.is_not(None),
            or_(
                JobEvent.to_state == JobState.FAILED.value,
                (JobEvent.to_state == JobState.QUEUED.value) & JobEvent.from_state.in_(attempted),
            ),
            *[JobEvent.note.not_like(f"{prefix}%") for prefix in _NOT_ERRORS],
            ~delivered_later,
        )
        .order_by(JobEvent.id.desc())
        .limit(limit)
    )
    return tuple(
        FailedAttempt(job_id, model, at, to_state, first_line(note or ""))
        for job_id, model, at, to_state, note in session.execute(query)
    )


def failing_destinations(session: Session, now: datetime) -> tuple[FailingDestination, ...]:
    """Return the destinations whose latest delivery attempts failed.

    A delivery waiting for its retry after an error (``pending`` with ``last_error``),
    or one that failed for good, in the last day, counts; a successful delivery to the
    same destination after it (the PACS is back) clears it. The time of a failed
    attempt is its job's ``updated_at``, which the attempt's end sets.

    Parameters
    ----------
    session : Session
        Database session.
    now : datetime
        The database's time (:func:`~dicomnode.db.engine.database_now`).

    Returns
    -------
    tuple[FailingDestination, ...]
        One per destination, by name.
    """
    later = aliased(Delivery)
    failing = (
        select(Delivery.destination, Job.updated_at, Delivery.last_error)
        .join(Job, Delivery.job_id == Job.id)
        .where(
            Delivery.last_error.is_not(None),
            Delivery.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)),
            Job.updated_at >= now - FAILED_DELIVERIES,
            ~exists().where(
                later.destination == Delivery.destination,
                later.state == DeliveryState.SENT,
                later.sent_at > Job.updated_at,
            ),
        )
        .order_by(Delivery.destination, Job.updated_at)
    )
    found: dict[str, dict[str, Any]] = {}
    for name, at, error in session.execute(failing):
        entry = found.setdefault(
            name, {"destination": name, "deliveries": 0, "since": at, "last_failed_at": at}
        )
        entry["deliveries"] += 1
        entry["last_failed_at"] = at
        entry["error"] = first_line(error or "")
    return tuple(FailingDestination(**entry) for entry in found.values())


def snapshot(session: Session) -> Snapshot:
    """Return the queue and delivery figures of ``dicomnode status``.

    Parameters
    ----------
    session : Session
        Database session.

    Returns
    -------
    Snapshot
        The figures, taken by the database's clock: the one leases and back-offs are
        set with (db.jobs), whichever host asks.
    """
    now = database_now(session)
    owners = session.scalars(
        select(Job.lease_owner)
        .where(
            Job.state.in_((JobState.RUNNING, JobState.SENDING)),
            Job.lease_owner.is_not(None),
            Job.lease_expires_at > now,
        )
        .distinct()
    ).all()
    depth = {s.value: 0 for s in JobState}
    for job_state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        depth[JobState(job_state).value] = int(count)
    oldest = session.execute(
        select(Job.id, Job.created_at)
        .where(Job.state == JobState.QUEUED)
        .order_by(Job.created_at, Job.id)
        .limit(1)
    ).first()
    deliveries = {s.value: 0 for s in (DeliveryState.PENDING, DeliveryState.FAILED)}
    for delivery_state, count in session.execute(
        select(Delivery.state, func.count())
        .where(Delivery.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)))
        .group_by(Delivery.state)
    ):
        deliveries[DeliveryState(delivery_state).value] = int(count)
    # Failed deliveries of jobs that changed in the last day: a failure an admin has
    # looked at and left (the job failed for good a month ago) does not stay a problem.
    failed_deliveries = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .join(Job, Delivery.job_id == Job.id)
        .where(Delivery.state == DeliveryState.FAILED, Job.updated_at >= now - FAILED_DELIVERIES)
    )
    # Runnable for a while and still not claimed: no worker runs, or none takes this model.
    stalled = session.scalar(
        select(func.count()).where(
            Job.state == JobState.QUEUED, Job.run_after <= now - STALLED_AFTER
        )
    )
    failed_recently = session.scalar(
        select(func.count()).where(
            Job.state == JobState.FAILED, Job.finished_at >= now - RECENT_FAILURES
        )
    )
    return Snapshot(
        now=now,
        busy=tuple(sorted(o for o in owners if o)),
        queue=tuple(depth.items()),
        oldest_queued=None
        if oldest is None
        else QueuedJob(oldest[0], oldest[1], round((now - oldest[1]).total_seconds(), 1)),
        deliveries=tuple(deliveries.items()),
        failed_last_hour=int(failed_recently or 0),
        stalled=int(stalled or 0),
        deliveries_failed_last_day=int(failed_deliveries or 0),
        failing_destinations=failing_destinations(session, now),
        last_errors=last_errors(session),
    )


def listen_connections(engine: Engine, channel: str) -> int | None:
    """Count the PostgreSQL connections waiting on ``LISTEN channel`` (worker processes).

    Parameters
    ----------
    engine : Engine
        A PostgreSQL engine.
    channel : str
        The wake-up channel.

    Returns
    -------
    int or None
        The count; None when the role may not read ``pg_stat_activity``.
    """
    try:
        with engine.connect() as conn:
            # Each worker process keeps one connection whose last statement is its LISTEN.
            count = conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query = :listen"
                ),
                {"listen": f"LISTEN {channel}"},
            )
    except Exception:  # a role that may not read pg_stat_activity: say unknown
        return None
    return int(count or 0)


def delivery_statistics(session: Session) -> dict[str, DeliveryCounts]:
    """Return per destination name its deliveries by state, last send and last error.

    Parameters
    ----------
    session : Session
        A session on the node's database.

    Returns
    -------
    dict[str, DeliveryCounts]
        Per destination name (configured or not: deliveries outlive a renamed
        destination); ``last_error`` is the first line of the newest delivery's error
        that has one.
    """
    stats: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return stats.setdefault(
            name, {"sent": 0, "pending": 0, "failed": 0, "last_sent_at": None, "last_error": None}
        )

    for name, state, n, last_sent in session.execute(
        select(
            Delivery.destination,
            Delivery.state,
            func.count(Delivery.id),
            func.max(Delivery.sent_at),
        ).group_by(Delivery.destination, Delivery.state)
    ):
        record = entry(name)
        record[DeliveryState(state).value] = int(n)
        if last_sent is not None and (
            record["last_sent_at"] is None or last_sent > record["last_sent_at"]
        ):
            record["last_sent_at"] = last_sent
    newest = (
        select(func.max(Delivery.id).label("id"))
        .where(Delivery.last_error.is_not(None))
        .group_by(Delivery.destination)
        .subquery()
    )
    for name, error in session.execute(
        select(Delivery.destination, Delivery.last_error).join(newest, Delivery.id == newest.c.id)
    ):
        entry(name)["last_error"] = first_line(error) or None if error else None

    return {name: DeliveryCounts(**record) for name, record in stats.items()}


def delivery_statistics_at(url: str, connect_timeout_s: float) -> dict[str, DeliveryCounts]:
    """Open the node's database at ``url`` and return :func:`delivery_statistics`.

    For a command that must answer quickly, or without the numbers: a missing SQLite
    file is not created, and a PostgreSQL server that does not answer gives up after
    ``connect_timeout_s``.

    Parameters
    ----------
    url : str
        The database URL.
    connect_timeout_s : float
        Seconds to wait for a PostgreSQL server.

    Returns
    -------
    dict[str, DeliveryCounts]
        As :func:`delivery_statistics`.

    Raises
    ------
    Exception
        Whatever stops the database from being read: not found, unreachable, not
        migrated (:class:`~dicomnode.errors.DicomnodeError`).
    """
    from dicomnode.db import migrate  # only when the statistics are read

    kwargs: dict[str, Any] = {}
    if make_url(url).get_backend_name() != "sqlite":
        kwargs["connect_args"] = {"connect_timeout": connect_timeout_s}
    # A missing SQLite file is not created; an old schema is not read.
    engine = migrate.open_current(url, **kwargs)
    try:
        return read(engine, delivery_statistics)
    finally:
        engine.dispose()
