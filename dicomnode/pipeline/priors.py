"""Priors: the patient's earlier study, found on this node or retrieved from a PACS.

For a route with ``priors.destination``, before the model runs the job looks for the
patient's other studies on this node (dated up to ``within_days`` before the current
one); when there are none it asks the PACS (C-FIND study, then series level),
retrieves the matching series by C-MOVE to the node's own AE title (the listener
stores them) or by C-GET (this job stores them), through the same durable path, into
series rows marked as priors. The route's ``select``
then picks the series to compare with, as it picks the current one.

A PACS that is down or does not answer delays the job (it is put back in the queue,
the attempt not counted) for at most ``priors.wait_seconds``; then, and at once for a
PACS that refuses or has nothing, the job goes on without priors and says why. What
was found, or why nothing was, is kept on the job (``jobs show``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Route, Settings
from dicomnode.db import Job, database_now, failing_since, transaction
from dicomnode.db.priors import LocalSeries, expect_prior, other_studies_series
from dicomnode.db.queries import series_input
from dicomnode.dimse.statuses import SUCCESS, status_for
from dicomnode.errors import IngestError, TransientJobError, WaitingForPriors
from dicomnode.imaging.routing import route_matches
from dicomnode.imaging.selection import Candidate, choose, read_positions
from dicomnode.send.query import (
    FoundSeries,
    RetrieveRefused,
    UnsafeQuery,
    dicom_date,
    find_series,
    find_studies,
    get_series,
    move_series,
)
from dicomnode.store import Ingestor, Spool

log = logging.getLogger(__name__)

WAITING = "waiting for priors"  # the job history's note while the PACS is unreachable
RETRY_SECONDS = 15.0  # how long a job waits before it asks the PACS again


@dataclass(frozen=True)
class Prior:
    """A prior series the job compares with."""

    study_uid: str
    study_date: date | None
    series_id: int
    series_uid: str


@dataclass(frozen=True)
class Priors:
    """What the priors stage found: the series to compare with, and the job's record."""

    found: list[Prior]
    record: dict[str, Any]


def _header(spool: Spool, path: str) -> Dataset | None:
    try:
        return pydicom.dcmread(spool.absolute(path), stop_before_pixels=True)
    except Exception:  # unreadable: that series cannot be a prior
        return None


def prior_route(route: Route) -> Route:
    """Return the route as it judges prior series: its own match rules and the priors'."""
    return dataclasses.replace(route, match={**route.match, **route.priors.match})


def _choose(
    sessions: sessionmaker[Session],
    route: Route,
    spool: Spool,
    stored: list[LocalSeries],
    patient_id: str,
    earliest: date,
    latest: date,
) -> tuple[list[Prior], list[dict[str, Any]]]:
    """Pick one series per prior study (newest studies first, up to ``priors.max``)."""
    by_study: dict[str, list[tuple[LocalSeries, Dataset]]] = {}
    for series in stored:
        header = _header(spool, series.first_path)
        if header is None or str(header.get("PatientID", "") or "") != patient_id:
            continue  # a retrieved image of another patient is never compared with
        by_study.setdefault(series.study_uid, []).append((series, header))
    dated: list[tuple[date | None, str]] = []
    for study_uid, members in by_study.items():
        when = dicom_date(members[0][1].get("StudyDate"))
        if when is None or earliest <= when <= latest:
            dated.append((when, study_uid))
    dated.sort(key=lambda item: item[0] or date.min, reverse=True)
    judge = prior_route(route)
    found: list[Prior] = []
    studies: list[dict[str, Any]] = []
    for when, study_uid in dated:
        if len(found) >= route.priors.max:
            break
        members = by_study[study_uid]
        candidates = []
        for series, header in members:
            positions = None
            if route.select.distinct_positions:
                with sessions() as session:
                    paths = series_input(session, series.series_id).paths
                positions = read_positions(spool.absolute(p) for p in paths)
            candidates.append(Candidate(series.series_uid, header, series.instances, positions))
        choice = choose(judge, candidates)
        studies.append(
            {
                "study_uid": study_uid,
                "study_date": None if when is None else when.isoformat(),
                **choice,
            }
        )
        chosen = next((s for s, _ in members if s.series_uid == choice["chosen"]), None)
        if chosen is not None:
            found.append(Prior(study_uid, when, chosen.series_id, chosen.series_uid))
    return found, studies


def resolve(
    settings: Settings,
    sessions: sessionmaker[Session],
    spool: Spool,
    route: Route,
    job_id: int,
    current: Dataset,
    checkpoint: Callable[[], None],
) -> Priors:
    """Find the priors of a job's study: here, else retrieved from ``priors.destination``.

    Parameters
    ----------
    settings : Settings
        The destinations and the listener's AE title (the move destination).
    sessions : sessionmaker[Session]
        Database sessions.
    spool : Spool
        Where stored images lie (their headers are read).
    route : Route
        The job's route; ``priors`` and ``select``.
    job_id : int
        The job (its history says since when the PACS has been unreachable).
    current : Dataset
        A header of the current series: Patient ID, Study Instance UID, Study Date.
    checkpoint : callable
        Raises when the worker must stop; called between retrievals.

    Returns
    -------
    Priors
        The series to compare with (possibly none) and the record kept on the job.

    Raises
    ------
    WaitingForPriors
        While the PACS is unreachable and ``priors.wait_seconds`` have not passed.
    """
    priors = route.priors
    patient_id = str(current.get("PatientID", "") or "")
    study_uid = str(current.StudyInstanceUID)
    latest = dicom_date(current.get("StudyDate")) or date.today()
    earliest = latest - timedelta(days=priors.within_days)
    # ``reason`` is for the admin (`jobs show`): it may name the PACS, its address and
    # its own words. ``report`` is what the SR sent to that PACS says: fixed phrases.
    record: dict[str, Any] = {"source": None, "studies": [], "reason": None, "report": None}

    def none(reason: str, report: str) -> Priors:
        record.update(reason=reason, report=report)
        return _kept(sessions, job_id, Priors([], record))

    with sessions() as session:
        stored = other_studies_series(session, patient_id, study_uid)
    found, studies = _choose(sessions, route, spool, stored, patient_id, earliest, latest)
    if found:
        record.update(source="node", studies=studies)
        return _kept(sessions, job_id, Priors(found, record))
    try:
        retrieved = _retrieve(
            settings, sessions, spool, route, patient_id, study_uid, latest, checkpoint
        )
    except UnsafeQuery as exc:
        return none(str(exc), "the Patient ID cannot be queried")
    except RetrieveRefused as exc:
        return none(str(exc), "the PACS refused to provide the prior study")
    except TransientJobError as exc:
        _wait_or_give_up(sessions, job_id, priors.wait_seconds, exc)
        return none(
            f"gave up after {priors.wait_seconds:g} s: {exc}", "the PACS could not be reached"
        )
    days = f"within {priors.within_days:g} days"
    if retrieved is None:
        return none(
            f"no earlier study of the patient on {priors.destination} {days}",
            f"no earlier study of the patient {days}",
        )
    if not retrieved:
        return none(
            f"no complete series of the earlier studies on {priors.destination} fits",
            "no earlier series fits",
        )
    with sessions() as session:
        stored = other_studies_series(session, patient_id, study_uid, retrieved)
    found, studies = _choose(sessions, route, spool, stored, patient_id, earliest, latest)
    record.update(source=priors.destination, studies=studies)
    if not found:
        return none("no retrieved series fits the route", "no earlier series fits")
    return _kept(sessions, job_id, Priors(found, record))


def _wait_or_give_up(
    sessions: sessionmaker[Session], job_id: int, wait_seconds: float, exc: Exception
) -> None:
    """Raise WaitingForPriors unless the PACS has been unreachable for ``wait_seconds``."""
    with sessions() as session:
        since, _ = failing_since(session, job_id, WAITING)
        now = database_now(session)
    waited = 0.0 if since is None else (now - since).total_seconds()
    if waited < wait_seconds:
        # The note stays the same while the PACS stays down: one history entry.
        raise WaitingForPriors(
            f"{WAITING}: {exc}", min(RETRY_SECONDS, max(wait_seconds - waited, 1.0))
        )


def _retrieve(
    settings: Settings,
    sessions: sessionmaker[Session],
    spool: Spool,
    route: Route,
    patient_id: str,
    study_uid: str,
    latest: date,
    checkpoint: Callable[[], None],
) -> list[str] | None:
    """Query the PACS and retrieve the matching series of the newest prior studies here.

    Returns the Series Instance UIDs retrieved: None when the PACS has no earlier
    study, empty when none of their series may fit.
    """
    priors = route.priors
    pacs = settings.destination(priors.destination)
    calling = settings.listener.ae_title
    modality = priors.match.get("Modality", route.match.get("Modality"))
    studies = find_studies(
        pacs,
        calling,
        patient_id=patient_id,
        exclude_study=study_uid,
        before=latest,
        within_days=priors.within_days,
        modality=modality if isinstance(modality, str) and ":" not in modality else None,
    )
    if not studies:
        return None
    ingestor = Ingestor(spool, sessions)

    def store(data: bytes) -> int:
        """Keep one instance a C-GET brought, as the listener would; return its status."""
        try:
            ingestor.store(data, calling_ae=pacs.ae_title)
        except IngestError as exc:  # one line, no PHI
            log.warning("prior instance from %s refused: %s", pacs.name, exc)
            return status_for(exc)
        return SUCCESS

    judge = prior_route(route)
    retrieved: list[str] = []
    for study in studies[: priors.max]:
        checkpoint()
        wanted = [s for s in find_series(pacs, calling, study.study_uid) if _may_fit(judge, s)]
        with transaction(sessions) as session:
            for series in wanted:
                expect_prior(
                    session,
                    study_uid=study.study_uid,
                    patient_id=patient_id,
                    series_uid=series.series_uid,
                    modality=series.modality,
                )
        for series in wanted:
            checkpoint()
            if priors.retrieve == "get":
                moved = get_series(
                    pacs,
                    calling,
                    study_uid=study.study_uid,
                    series_uid=series.series_uid,
                    store=store,
                    progress=checkpoint,
                )
            else:
                moved = move_series(
                    pacs,
                    calling,
                    move_to=settings.listener.ae_title,
                    study_uid=study.study_uid,
                    series_uid=series.series_uid,
                    progress=checkpoint,
                )
            log.info(
                "prior retrieved study_uid=%s series_uid=%s from=%s completed=%d failed=%d",
                study.study_uid,
                series.series_uid,
                pacs.name,
                moved.completed,
                moved.failed,
            )
            if moved.completed and not moved.failed:
                # A series with images missing is no volume to compare with.
                retrieved.append(series.series_uid)
    return retrieved


def _may_fit(route: Route, series: FoundSeries) -> bool:
    """Judge a series from what C-FIND gave: only the rules on attributes it answered."""
    answered = {k: v for k, v in route.match.items() if series.header.get(k) not in (None, "")}
    if not route_matches(dataclasses.replace(route, match=answered), series.header):
        return False
    # Fewer images than a volume needs (a localizer, a dose report): not worth retrieving.
    return series.instances is None or series.instances >= max(route.select.min_slices, 2)


def _kept(sessions: sessionmaker[Session], job_id: int, priors: Priors) -> Priors:
    """Keep the record on the job (``jobs show``), and log what was found."""
    with transaction(sessions) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        if job is not None:
            job.priors = priors.record
    if priors.found:
        log.info(
            "job %d: priors from %s: %s",
            job_id,
            priors.record["source"],
            ",".join(p.series_uid for p in priors.found),
        )
    else:
        log.info("job %d: no priors: %s", job_id, priors.record["reason"])
    return priors
