"""Content checks against the job table and the images."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.config import ContentCheck
from dicomnode.db import JobState, Series, Study, jobs, transaction
from dicomnode.errors import ContentCheckFailed, WaitingForModel
from dicomnode.pipeline.content import check_images, check_verdict


def series_with_job(sessions, state: JobState, volume_ml: float | None, generation: int = 0) -> int:
    """A series with one lungs job; ``volume_ml`` None: it has made no outputs yet."""
    with transaction(sessions) as s:
        study = Study(study_uid="1.5")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid="1.5.1", generation=generation)
        s.add(series)
        s.flush()
        job = jobs.enqueue(s, series, route="lungs", model="lungs", version="1", max_attempts=1)
        assert job is not None
        job.state = state
        job.summary = None if volume_ml is None else {"total_volume_ml": volume_ml}
        return series.id


CHECK = ContentCheck(model="lungs", min_volume_ml=100)


@pytest.mark.parametrize(
    ("state", "volume", "outcome"),
    [
        (JobState.DONE, 250.0, None),
        (JobState.DONE, 50.0, "found 50.0 mL, less than the 100 mL required"),
        (JobState.QUEUED, None, "waiting for lungs"),
        (JobState.RUNNING, None, "waiting for lungs"),
        (JobState.FAILED, None, "lungs did not succeed"),
        (JobState.CANCELLED, None, "lungs did not succeed"),
        # Outputs made, delivery still being retried or given up: the verdict stands,
        # so a PACS that is down holds up no other model.
        (JobState.QUEUED, 250.0, None),
        (JobState.SENDING, 250.0, None),
        (JobState.FAILED, 250.0, None),
        (JobState.SENDING, 50.0, "found 50.0 mL"),
    ],
)
def test_verdicts(sessions, state: JobState, volume: float | None, outcome: str | None) -> None:
    series_id = series_with_job(sessions, state, volume)
    with sessions() as s:
        if outcome is None:
            check_verdict(s, CHECK, series_id, 0)
        else:
            error = WaitingForModel if outcome.startswith("waiting") else ContentCheckFailed
            with pytest.raises(error, match=outcome):
                check_verdict(s, CHECK, series_id, 0)


def test_an_empty_mask_fails_even_without_a_minimum(sessions) -> None:
    series_id = series_with_job(sessions, JobState.DONE, 0.0)
    with sessions() as s, pytest.raises(ContentCheckFailed, match=r"found 0\.0 mL"):
        check_verdict(s, ContentCheck(model="lungs"), series_id, 0)


def test_a_reopened_series_needs_a_fresh_verdict(sessions) -> None:
    series_id = series_with_job(sessions, JobState.DONE, 500.0)  # generation 0's verdict
    with sessions() as s, pytest.raises(ContentCheckFailed, match="no lungs job"):
        check_verdict(s, CHECK, series_id, 1)


def test_image_checks() -> None:
    axial = np.array([0.0, 0.0, 1.0])
    check_images(ContentCheck(min_slices=10, axial=True), 10, axial)
    with pytest.raises(ContentCheckFailed, match="9 slices, fewer than the 10 required"):
        check_images(ContentCheck(min_slices=10), 9, axial)
    tilted = np.array([0.0, np.sin(np.radians(5)), np.cos(np.radians(5))])
    check_images(ContentCheck(axial=True), 10, tilted)  # 5 degrees: still axial
    coronal = np.array([0.0, 1.0, 0.0])
    with pytest.raises(ContentCheckFailed, match="not axial \\(90 degrees"):
        check_images(ContentCheck(axial=True), 10, coronal)
    check_images(ContentCheck(), 1, coronal)  # no checks asked for
