"""Rows for a prior about to be retrieved: made once, marked, and a purged series marked too."""

from __future__ import annotations

from sqlalchemy import select

from dicomnode.db import Series, SeriesState, Study, transaction, utcnow
from dicomnode.db.priors import expect_prior


def test_rows_are_made_once_and_marked(sessions) -> None:
    for _ in range(2):  # a second job of the patient expects the same prior
        with transaction(sessions) as s:
            expect_prior(s, study_uid="1.2.3", patient_id="P", series_uid="1.2.3.4",
                         modality="CT")  # fmt: skip
    with sessions() as s:
        (series,) = s.scalars(select(Series)).all()
        assert (series.prior, series.state, series.instance_count) == (
            True, SeriesState.RECEIVING, 0,
        )  # fmt: skip
        assert s.scalars(select(Study)).one().patient_id == "P"


def test_a_series_received_normally_stays_normal_unless_retention_purged_it(sessions) -> None:
    with transaction(sessions) as s:
        study = Study(study_uid="1.2.3", patient_id="P")
        s.add(study)
        s.flush()
        for uid, purged in (("1.2.3.1", None), ("1.2.3.2", utcnow())):
            s.add(Series(study_id=study.id, series_uid=uid, state=SeriesState.COMPLETE,
                         purged_at=purged))  # fmt: skip
    with transaction(sessions) as s:
        for uid in ("1.2.3.1", "1.2.3.2"):
            expect_prior(s, study_uid="1.2.3", patient_id="P", series_uid=uid, modality="CT")
    with sessions() as s:
        marks = {x.series_uid: x.prior for x in s.scalars(select(Series))}
    # Retrieved again, a purged series must not re-open and run its routes a second time.
    assert marks == {"1.2.3.1": False, "1.2.3.2": True}
