"""Jobs as the CLI shows them: frozen views read from the job tables.

``dicomnode jobs list``, ``jobs show`` (and its ``--preview``), ``jobs purge`` and
``studies show`` print what these return. A view holds plain values (str, int,
datetime, tuples of other views; a job's timings and summary are copies of their JSON
documents), read while the session is open: no ORM object, and no session, reaches the
caller, so nothing it does can load a row late or write one by mistake.

Patient data (a study's patient ID and accession number) is read only when asked for
with ``show_phi``; otherwise those fields are None.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from dicomnode.db import jobs
from dicomnode.db.models import Delivery, Instance, Job, JobState, Series, Study


@dataclass(frozen=True)
class JobView:
    """One job, as a line of ``jobs list``; the fields, in order, are ``--json``'s keys."""

    id: int
    state: str
    route: str
    model: str
    model_version: str
    series_uid: str
    study_uid: str
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None  # of the latest claim (a re-send's, too)
    finished_at: datetime | None
    last_error: str | None
    patient_id: str | None  # None unless read with show_phi
    accession_number: str | None  # None unless read with show_phi


@dataclass(frozen=True)
class OutputView:
    """A DICOM object a job made; the fields are the keys ``jobs show --json`` prints."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    path: str  # relative to the spool root
    size_bytes: int


@dataclass(frozen=True)
class DeliveryView:
    """Sending a job's results to one destination; the fields are ``jobs show --json``'s."""

    destination: str
    state: str
    attempts: int
    sent_at: datetime | None
    last_error: str | None
    warning: str | None
    commitment: str | None  # see delivery_commitment()
    commitment_uid: str | None
    commitment_requested_at: datetime | None
    confirmed_at: datetime | None
    commitment_failed: str | None


@dataclass(frozen=True)
class EventView:
    """One state transition of a job's history."""

    at: datetime
    from_state: str | None  # None for the job's creation
    to_state: str
    attempt: int
    counted: bool  # whether the attempt counts against max_attempts (see _counted)
    worker: str | None
    note: str | None


@dataclass(frozen=True)
class JobDetail:
    """One job in full, as ``jobs show`` and ``studies show`` print it."""

    job: JobView
    run_started_at: datetime | None  # when the run that made the results began
    resent_at: datetime | None  # the latest claim after that: a re-send
    lease_owner: str | None
    claimed_by: str | None
    lease_expires_at: datetime | None
    run_after: datetime
    timings: dict[str, Any]  # seconds per stage; a copy of the row's JSON
    summary: dict[str, Any]  # key results; a copy of the row's JSON
    selection: dict[str, Any] | None  # a study-scope job: which series was chosen, why
    priors: dict[str, Any] | None  # a route with priors: which prior study, or why none
    outputs: tuple[OutputView, ...]
    deliveries: tuple[DeliveryView, ...]
    history: tuple[EventView, ...]


@dataclass(frozen=True)
class PreviewSource:
    """What ``jobs show --preview`` draws: the job, its newest SEG and its source files."""

    detail: JobDetail
    seg_path: str | None  # spool-relative; None when the job has no SEG output
    instance_paths: tuple[str, ...]  # spool-relative, in no particular order


def delivery_commitment(delivery: Delivery) -> str | None:
    """Return where a delivery's storage commitment stands.

    Parameters
    ----------
    delivery : Delivery
        The delivery.

    Returns
    -------
    str or None
        "confirmed", "requested" (sent, no report yet), "failed" (the PACS reported
        failures or none came in time; the delivery was re-opened), or None when no
        commitment was asked for.
    """
    if delivery.confirmed_at is not None:
        return "confirmed"
    if delivery.commitment_uid is not None:
        return "requested"
    if delivery.commitment_failed:
        return "failed"
    return None


def view_of(job: Job, *, show_phi: bool = False) -> JobView:
    """Return a job's line, reading its series and study (the session must be open).

    Parameters
    ----------
    job : Job
        The job.
    show_phi : bool
        Read the study's patient ID and accession number too.

    Returns
    -------
    JobView
        The view.
    """
    study = job.series.study
    return JobView(
        id=job.id,
        state=job.state.value,
        route=job.route,
        model=job.model,
        model_version=job.model_version,
        series_uid=job.series.series_uid,
        study_uid=study.study_uid,
        priority=job.priority,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        last_error=job.last_error,
        patient_id=study.patient_id if show_phi else None,
        accession_number=study.accession_number if show_phi else None,
    )


def detail_of(job: Job, *, show_phi: bool = False) -> JobDetail:
    """Return a job in full: its outputs, deliveries and history (the session must be open).

    Parameters
    ----------
    job : Job
        The job.
    show_phi : bool
        Read the study's patient ID and accession number too.

    Returns
    -------
    JobDetail
        The view.
    """
    run_started, resent = _run_times(job)
    events = list(job.events)
    return JobDetail(
        job=view_of(job, show_phi=show_phi),
        run_started_at=run_started,
        resent_at=resent,
        lease_owner=job.lease_owner,
        claimed_by=job.claimed_by,
        lease_expires_at=job.lease_expires_at,
        run_after=job.run_after,
        timings=copy.deepcopy(job.timings or {}),
        summary=copy.deepcopy(job.summary or {}),
        selection=copy.deepcopy(job.selection),
        priors=copy.deepcopy(job.priors),
        outputs=tuple(
            OutputView(
                o.kind, o.sop_class_uid, o.sop_instance_uid, o.series_uid, o.path, o.size_bytes
            )
            for o in job.outputs
        ),
        deliveries=tuple(
            DeliveryView(
                destination=d.destination,
                state=d.state.value,
                attempts=d.attempts,
                sent_at=d.sent_at,
                last_error=d.last_error,
                warning=d.warning,
                commitment=delivery_commitment(d),
                commitment_uid=d.commitment_uid,
                commitment_requested_at=d.commitment_requested_at,
                confirmed_at=d.confirmed_at,
                commitment_failed=d.commitment_failed,
            )
            for d in job.deliveries
        ),
        history=tuple(
            EventView(e.at, e.from_state, e.to_state, e.attempt, counted, e.worker, e.note)
            for e, counted in zip(events, _counted(job), strict=True)
        ),
    )


_ATTEMPTED = (JobState.RUNNING.value, JobState.SENDING.value)


def _counted(job: Job) -> list[bool]:
    """Say per history event whether its attempt counts against ``max_attempts``.

    ``attempts`` is the budget used: an attempt that only re-sent stored results, or
    that a full disk or a worker's stop ended, is given back after its event was written
    with the attempt's number. ``jobs list`` then says 0/5 where the history says
    attempt 1; marking such an attempt "not counted" makes the two agree. An attempt was
    given back when the next claim has the same number again, or, for the latest one,
    when the job's count is below it.
    """
    events = list(job.events)
    counted = [True] * len(events)
    for i, e in enumerate(events):
        if e.from_state not in _ATTEMPTED or e.to_state != JobState.QUEUED.value:
            continue
        claim = next((c for c in events[i + 1 :] if c.to_state == JobState.RUNNING.value), None)
        given_back = e.attempt == claim.attempt if claim is not None else job.attempts < e.attempt
        if given_back:
            counted[i] = False
            # The claim that began this attempt carries the same number: mark it too.
            for j in range(i - 1, -1, -1):
                if events[j].to_state == JobState.RUNNING.value:
                    counted[j] = events[j].attempt != e.attempt
                    break
    return counted


def _run_times(job: Job) -> tuple[datetime | None, datetime | None]:
    """Return when the run that made the job's results began, and the latest re-send.

    A claim sets ``started_at``, also the claim of an attempt that only re-sends stored
    outputs: read alone, it showed the re-send's time as the run's. The run is the
    latest claim before the first output was written; a claim after it is a re-send.
    ``(started_at, None)`` for a job without outputs or re-sends.
    """
    made = min((o.created_at for o in job.outputs), default=None)
    if made is None:
        return job.started_at, None
    claims = [e.at for e in job.events if e.to_state == JobState.RUNNING.value]
    run = max((at for at in claims if at <= made), default=job.started_at)
    resent = max((at for at in claims if at > made), default=None)
    return run, resent


def find_jobs(
    session: Session,
    *,
    limit: int,
    state: str | None = None,
    route: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    study_uid: str | None = None,
    accession: str | None = None,
    show_phi: bool = False,
) -> tuple[JobView, ...]:
    """Return jobs, newest first, filtered by whichever criteria are given.

    Parameters
    ----------
    session : Session
        The session.
    limit : int
        At most this many.
    state : str, optional
        Jobs in this state (a :class:`~dicomnode.db.models.JobState` value).
    route, model : str, optional
        Jobs of this route, running this model.
    since : datetime, optional
        Jobs created then or later.
    study_uid, accession : str, optional
        Jobs on a series of the study with this Study Instance UID or accession number.
    show_phi : bool
        Read each job's patient ID and accession number too.

    Returns
    -------
    tuple[JobView, ...]
        The jobs.
    """
    query = (
        select(Job)
        .order_by(Job.id.desc())
        .limit(limit)
        # Each line names its series and study: two queries for the page, not two a job.
        .options(selectinload(Job.series).selectinload(Series.study))
    )
    if state:
        query = query.where(Job.state == JobState(state))
    if route:
        query = query.where(Job.route == route)
    if model:
        query = query.where(Job.model == model)
    if since is not None:
        query = query.where(Job.created_at >= since)
    if study_uid or accession:
        query = query.join(Series, Job.series_id == Series.id).join(
            Study, Series.study_id == Study.id
        )
        if study_uid:
            query = query.where(Study.study_uid == study_uid)
        if accession:
            query = query.where(Study.accession_number == accession)
    return tuple(view_of(j, show_phi=show_phi) for j in session.scalars(query))


def job_detail(session: Session, job_id: int, *, show_phi: bool = False) -> JobDetail:
    """Return one job in full.

    Parameters
    ----------
    session : Session
        The session.
    job_id : int
        The job's id.
    show_phi : bool
        Read its patient ID and accession number too.

    Returns
    -------
    JobDetail
        The job, its outputs, deliveries and history.

    Raises
    ------
    LookupError
        If there is no such job.
    """
    return detail_of(jobs.get(session, job_id), show_phi=show_phi)


def preview_source(session: Session, job_id: int, *, show_phi: bool = False) -> PreviewSource:
    """Return a job in full with what a preview of it reads: its newest SEG, its source.

    Parameters
    ----------
    session : Session
        The session.
    job_id : int
        The job's id.
    show_phi : bool
        Read its patient ID and accession number too.

    Returns
    -------
    PreviewSource
        The job, the spool path of its newest SEG (None when it has none) and those of
        its source series' stored instances.

    Raises
    ------
    LookupError
        If there is no such job.
    """
    job = jobs.get(session, job_id)
    detail = detail_of(job, show_phi=show_phi)
    # Job.outputs is ordered by id: the last SEG of them is the newest.
    segs = [o.path for o in detail.outputs if o.kind == "seg"]
    return PreviewSource(
        detail=detail,
        seg_path=segs[-1] if segs else None,
        instance_paths=tuple(
            session.scalars(select(Instance.path).where(Instance.series_id == job.series_id))
        ),
    )


@dataclass(frozen=True)
class SeriesInput:
    """A series' instances as a job reads them, and the digest of exactly those contents."""

    paths: list[str]  # spool-relative, by SOP Instance UID
    digest: str  # sha256 over each instance's SOP Instance UID and content digest


def series_input(session: Session, series_id: int) -> SeriesInput:
    """Return the instance paths of a series and the digest that identifies its contents.

    Output UIDs (and a finding's Tracking UID) depend on the digest: the same contents
    give the same objects, a changed instance new ones.

    Parameters
    ----------
    session : Session
        An open session.
    series_id : int
        The series.

    Returns
    -------
    SeriesInput
        Its paths and digest.
    """
    rows = session.execute(
        select(Instance.path, Instance.sop_instance_uid, Instance.sha256)
        .where(Instance.series_id == series_id)
        .order_by(Instance.sop_instance_uid)
    ).all()
    digest = hashlib.sha256()
    for _, sop_uid, sha in rows:
        digest.update(f"{sop_uid}:{sha};".encode())
    return SeriesInput([path for path, _, _ in rows], digest.hexdigest())
