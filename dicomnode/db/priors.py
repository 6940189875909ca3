"""The database side of priors: the patient's other studies here, and prior series to expect.

A prior retrieved from a PACS arrives at the listener like any image. Its series row
is made first, marked ``prior``, so that the listener counts the images into it and
the completion sweep runs no routes on it (and re-opens no study for it).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.db.models import Instance, Series, SeriesState, Study, utcnow


@dataclass(frozen=True)
class LocalSeries:
    """A stored series of another study of the patient: a possible prior."""

    series_id: int
    series_uid: str
    study_uid: str
    instances: int
    first_path: str  # spool-relative: its header is read to judge it


def other_studies_series(
    session: Session, patient_id: str, exclude_study: str, series_uids: list[str] | None = None
) -> list[LocalSeries]:
    """Return the stored series of the patient's other studies (or of the given series).

    Without ``series_uids`` only complete series count: one still receiving may be
    another job's retrieval in progress, or a study not yet whole.

    Parameters
    ----------
    session : Session
        An open session.
    patient_id : str
        The exact Patient ID; an empty one finds nothing.
    exclude_study : str
        The current study's UID.
    series_uids : list of str, optional
        Only these series (the ones just retrieved).

    Returns
    -------
    list[LocalSeries]
        Series with at least one instance and not purged, oldest row first.
    """
    if not patient_id:
        return []
    first = (
        select(Instance.series_id, func.min(Instance.path).label("path"), func.count().label("n"))
        .group_by(Instance.series_id)
        .subquery()
    )
    query = (
        select(Series.id, Series.series_uid, Study.study_uid, first.c.n, first.c.path)
        .join(Study, Study.id == Series.study_id)
        .join(first, first.c.series_id == Series.id)
        .where(
            Study.patient_id == patient_id,
            Study.study_uid != exclude_study,
            Series.purged_at.is_(None),
        )
        .order_by(Series.id)
    )
    if series_uids is not None:
        query = query.where(Series.series_uid.in_(series_uids))
    else:
        query = query.where(Series.state == SeriesState.COMPLETE)
    return [LocalSeries(*row) for row in session.execute(query)]


def expect_prior(
    session: Session,
    *,
    study_uid: str,
    patient_id: str,
    series_uid: str,
    modality: str | None,
) -> None:
    """Make the rows a retrieved prior series will be stored into, marked ``prior``.

    A series the node already has keeps its row and its mark (received normally, it
    stays a normal series), unless retention purged its images: retrieved again, it
    must not re-open and run its routes a second time, so it becomes a prior.

    Parameters
    ----------
    session : Session
        The open transaction (committed before the retrieval starts).
    study_uid, patient_id, series_uid : str
        The prior study, its patient and the series to retrieve.
    modality : str, optional
        As the PACS answered.
    """
    existing = session.scalar(select(Series).where(Series.series_uid == series_uid))
    if existing is not None:
        if existing.purged_at is not None:
            existing.prior = True
        return
    try:
        # Two jobs of one patient may expect the same prior at once: the loser's rows
        # already exist, which is all it needs (PostgreSQL's unique index says so).
        with session.begin_nested():
            _add_prior(session, study_uid, patient_id, series_uid, modality)
    except IntegrityError:
        pass


def _add_prior(
    session: Session, study_uid: str, patient_id: str, series_uid: str, modality: str | None
) -> None:
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        study = Study(study_uid=study_uid, patient_id=patient_id)
        session.add(study)
        session.flush()
    now = utcnow()
    session.add(
        Series(
            study_id=study.id,
            series_uid=series_uid,
            modality=(modality or None) and modality[:16],
            state=SeriesState.RECEIVING,
            generation=0,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            prior=True,
        )
    )
    session.flush()
