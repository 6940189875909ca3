"""Reads about studies: summaries of many, everything about one.

``dicomnode studies`` prints what these return: frozen views of plain values (see
:mod:`dicomnode.db.queries`), never ORM rows; nothing here writes. Patient data is read
only when asked for with ``show_phi``; otherwise those fields are None.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.orm import Session, selectinload

from dicomnode.db import audit, queries
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


@dataclass(frozen=True)
class StudySummary:
    """One study, as a line of ``studies list``; the fields, in order, are ``--json``'s keys."""

    study_uid: str
    patient_id: str | None  # None unless read with show_phi
    accession_number: str | None  # None unless read with show_phi
    state: str  # receiving, complete or purged (see study_summaries)
    series: int
    instances: int
    first_received_at: datetime | None  # None for a study without series
    last_received_at: datetime | None
    jobs: tuple[tuple[str, int], ...]  # (state, count): the states it has, JOB_STATE_ORDER
    deliveries: tuple[tuple[str, int], ...]  # (state, count): each of DELIVERY_STATE_ORDER


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
) -> tuple[StudySummary, ...]:
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
        ``receiving`` (a series still receives), ``purged`` (retention deleted the
        images of every series) or ``complete``.
    limit : int, optional
        At most this many.
    show_phi : bool
        Read ``patient_id`` and ``accession_number`` too.

    Returns
    -------
    tuple[StudySummary, ...]
        One per study.
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
    return tuple(
        StudySummary(
            study_uid=row.study_uid,
            patient_id=row.patient_id if show_phi else None,
            accession_number=row.accession_number if show_phi else None,
            state=row.state,
            series=int(row.series),
            instances=int(row.instances),
            first_received_at=row.first_received_at,
            last_received_at=row.last_received_at,
            jobs=tuple((s, jobs[row.id][s]) for s in JOB_STATE_ORDER if s in jobs[row.id]),
            deliveries=tuple((s, deliveries[row.id].get(s, 0)) for s in DELIVERY_STATE_ORDER),
        )
        for row in rows
    )


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
class _StudyRows:
    """What the database holds about one study, for :func:`study_story`."""

    series: list[Series]
    stored: dict[int, tuple[int, int]]  # series id -> (instances, bytes) still stored
    senders: dict[str, set[str]]  # series UID -> calling AE titles of its instances
    jobs: list[Job]  # with outputs, deliveries and history loaded


def _study_rows(session: Session, study: Study) -> _StudyRows:
    """Return a study's series, what is stored of them, who sent them, and its jobs.

    Parameters
    ----------
    session : Session
        The session.
    study : Study
        The study.

    Returns
    -------
    _StudyRows
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
    return _StudyRows(series_rows, stored, senders, jobs)


@dataclass(frozen=True)
class SeriesView:
    """One series of a study, as ``studies show`` prints it."""

    series_uid: str
    modality: str | None
    state: str
    generation: int
    instances: int  # received, retention's deletions included
    stored_instances: int  # still in the spool
    stored_bytes: int
    expected_instances: int | None
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    purged_at: datetime | None
    calling_aes: tuple[str, ...]  # who sent it, sorted: its instances' and the audit trail's


@dataclass(frozen=True)
class StudyStory:
    """Everything known about one study: ``studies show``, whose ``--json`` keys are these."""

    study_uid: str
    patient_id: str | None  # None unless read with show_phi
    accession_number: str | None  # None unless read with show_phi
    state: str  # receiving, complete or purged, as study_summaries() says
    created_at: datetime
    first_received_at: datetime | None  # None for a study without series
    last_received_at: datetime | None
    series: tuple[SeriesView, ...]
    jobs: tuple[queries.JobDetail, ...]  # outputs, deliveries and history included
    timeline: tuple[audit.Entry, ...]  # the study's audit entries, oldest first
    # Study-scope routes: route -> the latest choice of input series (selection.choose)
    selections: dict[str, Any]


@dataclass(frozen=True)
class StudyLookup:
    """What looking a study up found: its story, or every match, or nothing."""

    story: StudyStory | None  # the study, when exactly one matched
    matches: tuple[StudySummary, ...]  # when an accession number matched several


def study_story(session: Session, study: Study, *, show_phi: bool = False) -> StudyStory:
    """Return everything known about one study.

    Parameters
    ----------
    session : Session
        The session.
    study : Study
        The study.
    show_phi : bool
        Read ``patient_id`` and ``accession_number`` too.

    Returns
    -------
    StudyStory
        Its series (each with its counts, bytes, timestamps and the calling AE titles
        that sent it), its jobs in full and its audit entries.
    """
    rows = _study_rows(session, study)
    stored = rows.stored
    series = [
        SeriesView(
            series_uid=s.series_uid,
            modality=s.modality,
            state=s.state.value,
            generation=s.generation,
            instances=s.instance_count,
            stored_instances=stored.get(s.id, (0, 0))[0],
            stored_bytes=stored.get(s.id, (0, 0))[1],
            expected_instances=s.expected_instances,
            first_received_at=s.first_received_at,
            last_received_at=s.last_received_at,
            completed_at=s.completed_at,
            purged_at=s.purged_at,
            calling_aes=(),
        )
        for s in rows.series
    ]
    receiving = sum(1 for s in series if s.state == SeriesState.RECEIVING.value)
    purged = sum(1 for s in series if s.purged_at is not None)
    if receiving:
        state = "receiving"
    elif series and purged == len(series):
        state = "purged"
    else:
        state = "complete"
    # Everything is read off the rows before the audit trail is: its reading ends the
    # transaction batch by batch, and rows read earlier would then load again.
    study_uid, created_at = study.study_uid, study.created_at
    selections = copy.deepcopy(study.selections or {})
    patient_id = study.patient_id if show_phi else None
    accession_number = study.accession_number if show_phi else None
    jobs = tuple(queries.detail_of(j) for j in rows.jobs)
    timeline = tuple(audit.Entry(**e) for e in audit.entries(session, study_uid=study_uid))
    senders = rows.senders
    for entry in timeline:
        # Retention deletes the instance rows; the trail still says who sent them.
        if entry.event == "instances-received" and entry.actor and entry.series_uid:
            senders.setdefault(entry.series_uid, set()).add(entry.actor)
    return StudyStory(
        study_uid=study_uid,
        patient_id=patient_id,
        accession_number=accession_number,
        state=state,
        created_at=created_at,
        first_received_at=min((s.first_received_at for s in series), default=None),
        last_received_at=max((s.last_received_at for s in series), default=None),
        series=tuple(
            replace(s, calling_aes=tuple(sorted(senders.get(s.series_uid, ())))) for s in series
        ),
        jobs=jobs,
        timeline=timeline,
        selections=selections,
    )


def find_study(
    session: Session,
    *,
    study_uid: str | None = None,
    accession: str | None = None,
    show_phi: bool = False,
) -> StudyLookup:
    """Look one study up by its Study Instance UID, or else by its accession number.

    Parameters
    ----------
    session : Session
        The session.
    study_uid : str, optional
        The Study Instance UID; when None, ``accession`` is looked for.
    accession : str, optional
        The accession number, which several studies may share (it is not unique
        across sending sites).
    show_phi : bool
        Read ``patient_id`` and ``accession_number`` too.

    Returns
    -------
    StudyLookup
        The story of the one study found; the summaries of every match when the
        accession number matched several; neither when nothing matched.
    """
    if study_uid is not None:
        study = by_uid(session, study_uid)
        story = None if study is None else study_story(session, study, show_phi=show_phi)
        return StudyLookup(story, ())
    matches = by_accession(session, accession) if accession is not None else []
    if len(matches) == 1:
        return StudyLookup(study_story(session, matches[0], show_phi=show_phi), ())
    if not matches:
        return StudyLookup(None, ())
    return StudyLookup(None, study_summaries(session, accession=accession, show_phi=show_phi))
