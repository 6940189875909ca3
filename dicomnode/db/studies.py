"""Reads about studies: summaries of many, everything about one, their files.

``dicomnode studies`` prints what these return; nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.orm import Session, selectinload

from dicomnode.db.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
)

JOB_STATE_ORDER = tuple(s.value for s in JobState)
DELIVERY_STATE_ORDER = tuple(
    s.value for s in (DeliveryState.SENT, DeliveryState.PENDING, DeliveryState.FAILED)
)


def _state_expression(
    series: ColumnElement[int], receiving: ColumnElement[int], purged: ColumnElement[int]
) -> ColumnElement[str]:
    return case(
        (receiving > 0, "receiving"),
        (and_(series > 0, purged == series), "purged"),
        else_="complete",
    )


def study_summaries(
    session: Session,
    *,
    since: datetime | None = None,
    accession: str | None = None,
    patient_id: str | None = None,
    state: str | None = None,
    limit: int | None = None,
    show_phi: bool = False,
) -> list[dict[str, Any]]:
    """Return studies newest first (by their latest received instance), summarised.

    Three queries whatever the number of studies: the studies with their series
    aggregated, then their jobs and their deliveries counted per state.

    Parameters
    ----------
    session : Session
        Database session.
    since : datetime, optional
        Only studies that received an instance at or after this moment.
    accession, patient_id : str, optional
        Only studies with this accession number or patient ID.
    state : str, optional
        ``receiving``, ``complete`` or ``purged`` (see :func:`study_state`).
    limit : int, optional
        At most this many.
    show_phi : bool
        Include ``patient_id`` and ``accession_number``.

    Returns
    -------
    list[dict[str, Any]]
        One record per study: ``study_uid``, ``state``, ``series``, ``instances``,
        ``first_received_at``, ``last_received_at``, ``jobs`` and ``deliveries``
        (counts per state).
    """
    series_n = func.count(Series.id)
    receiving_n = func.coalesce(
        func.sum(case((Series.state == SeriesState.RECEIVING, 1), else_=0)), 0
    )
    purged_n = func.coalesce(func.sum(case((Series.purged_at.is_not(None), 1), else_=0)), 0)
    first = func.min(Series.first_received_at)
    last = func.max(Series.last_received_at)
    state_expr = _state_expression(series_n, receiving_n, purged_n)
    query = (
        select(
            Study.id,
            Study.study_uid,
            Study.patient_id,
            Study.accession_number,
            series_n.label("series"),
            func.coalesce(func.sum(Series.instance_count), 0).label("instances"),
            first.label("first_received_at"),
            last.label("last_received_at"),
            state_expr.label("state"),
        )
        .select_from(Study)
        .outerjoin(Series, Series.study_id == Study.id)
        .group_by(Study.id, Study.study_uid, Study.patient_id, Study.accession_number)
        .order_by(func.coalesce(last, Study.created_at).desc(), Study.id.desc())
    )
    if accession is not None:
        query = query.where(Study.accession_number == accession)
    if patient_id is not None:
        query = query.where(Study.patient_id == patient_id)
    if since is not None:
        query = query.having(last >= since)
    if state is not None:
        query = query.having(state_expr == state)
    if limit is not None:
        query = query.limit(limit)
    rows = session.execute(query).all()
    ids = [row.id for row in rows]
    jobs: dict[int, dict[str, int]] = {i: {} for i in ids}
    deliveries: dict[int, dict[str, int]] = {i: {} for i in ids}
    if ids:
        for study_id, job_state, n in session.execute(
            select(Series.study_id, Job.state, func.count(Job.id))
            .join(Series, Job.series_id == Series.id)
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id, Job.state)
        ):
            jobs[study_id][JobState(job_state).value] = int(n)
        for study_id, delivery_state, n in session.execute(
            select(Series.study_id, Delivery.state, func.count(Delivery.id))
            .join(Job, Delivery.job_id == Job.id)
            .join(Series, Job.series_id == Series.id)
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id, Delivery.state)
        ):
            deliveries[study_id][DeliveryState(delivery_state).value] = int(n)
    records = []
    for row in rows:
        record: dict[str, Any] = {"study_uid": row.study_uid}
        if show_phi:
            record["patient_id"] = row.patient_id
            record["accession_number"] = row.accession_number
        record.update(
            state=row.state,
            series=int(row.series),
            instances=int(row.instances),
            first_received_at=row.first_received_at,
            last_received_at=row.last_received_at,
            jobs={s: jobs[row.id][s] for s in JOB_STATE_ORDER if s in jobs[row.id]},
            deliveries={s: deliveries[row.id].get(s, 0) for s in DELIVERY_STATE_ORDER},
        )
        records.append(record)
    return records


def by_uid(session: Session, study_uid: str) -> Study | None:
    """Return the study with this Study Instance UID, if we have it.

    Parameters
    ----------
    session : Session
        The session.
    study_uid : str
        The Study Instance UID.

    Returns
    -------
    Study or None
        The study.
    """
    return session.scalars(select(Study).where(Study.study_uid == study_uid)).first()


def by_accession(session: Session, accession: str) -> list[Study]:
    """Return the studies with this accession number, oldest first.

    Parameters
    ----------
    session : Session
        The session.
    accession : str
        The accession number.

    Returns
    -------
    list[Study]
        Every match: an accession number is not unique across sending sites.
    """
    return list(
        session.scalars(select(Study).where(Study.accession_number == accession).order_by(Study.id))
    )


@dataclass(frozen=True)
class StudyRows:
    """What the database holds about one study, for ``studies show``."""

    series: list[Series]
    stored: dict[int, tuple[int, int]]  # series id -> (instances, bytes) still stored
    senders: dict[str, set[str]]  # series UID -> calling AE titles of its instances
    jobs: list[Job]  # with outputs, deliveries and history loaded


def study_rows(session: Session, study: Study) -> StudyRows:
    """Return a study's series, what is stored of them, who sent them, and its jobs.

    Parameters
    ----------
    session : Session
        The session.
    study : Study
        The study.

    Returns
    -------
    StudyRows
        Four queries' worth, whatever the number of series.
    """
    series_rows = list(
        session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id))
    )
    series_ids = [s.id for s in series_rows]
    stored: dict[int, tuple[int, int]] = {}
    senders: dict[str, set[str]] = {s.series_uid: set() for s in series_rows}
    jobs: list[Job] = []
    if series_ids:
        for series_id, n, size in session.execute(
            select(Instance.series_id, func.count(Instance.id), func.sum(Instance.size_bytes))
            .where(Instance.series_id.in_(series_ids))
            .group_by(Instance.series_id)
        ):
            stored[series_id] = (int(n), int(size or 0))
        uids = {s.id: s.series_uid for s in series_rows}
        for series_id, calling_ae in session.execute(
            select(Instance.series_id, Instance.calling_ae)
            .where(Instance.series_id.in_(series_ids), Instance.calling_ae.is_not(None))
            .distinct()
        ):
            senders[uids[series_id]].add(str(calling_ae))
        jobs = list(
            session.scalars(
                select(Job)
                .where(Job.series_id.in_(series_ids))
                .options(
                    selectinload(Job.outputs),
                    selectinload(Job.deliveries),
                    selectinload(Job.events),
                )
                .order_by(Job.id)
            )
        )
    return StudyRows(series_rows, stored, senders, jobs)


def instance_paths(session: Session, series_id: int) -> list[str]:
    """Return the spool-relative paths of a series' stored instances.

    Parameters
    ----------
    session : Session
        The session.
    series_id : int
        The series.

    Returns
    -------
    list[str]
        The paths, in no particular order.
    """
    return list(session.scalars(select(Instance.path).where(Instance.series_id == series_id)))
