"""Content checks: what a series must show before a route's models run on it.

A route's ``match`` reads headers, and series descriptions are unreliable. These
checks look at the loaded images (slice count, orientation) and at another model's
verdict on the same series (e.g. a lung mask that is not empty), so that a nodule
model never runs on a scout, a sagittal reformat or a series with no lungs in it.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import ContentCheck
from dicomnode.db import Job, JobState
from dicomnode.errors import ContentCheckFailed, WaitingForModel
from dicomnode.imaging.selection import AXIAL_DEGREES, tilt_degrees

WAIT_SECONDS = 5.0  # how long a job waits before it looks for the other verdict again


def check_verdict(session: Session, check: ContentCheck, series_id: int, generation: int) -> None:
    """Require the other model's job on this series to have found enough.

    Its verdict stands as soon as its outputs are made and recorded (the job's summary),
    whatever happens to their delivery: a PACS that is down must not hold up the
    models that wait for this one.

    Parameters
    ----------
    session : Session
        A database session.
    check : ContentCheck
        The route's checks; nothing to do when it names no model.
    series_id, generation : int
        The series and its generation (a re-opened series needs a fresh verdict).

    Raises
    ------
    WaitingForModel
        If that model's job has not made its outputs yet.
    ContentCheckFailed
        If it failed or was cancelled before making them, never ran, or found less than
        ``min_volume_ml``.
    """
    if not check.model:
        return
    jobs = session.scalars(
        select(Job)
        .where(
            Job.series_id == series_id,
            Job.generation == generation,
            Job.model == check.model,
        )
        .order_by(Job.id)
    ).all()
    if not jobs:
        raise ContentCheckFailed(
            f"content check: no {check.model} job for this series (no route runs it here)"
        )
    decided = [j for j in jobs if "total_volume_ml" in (j.summary or {})]
    if not decided:
        if any(j.state in (JobState.QUEUED, JobState.RUNNING, JobState.SENDING) for j in jobs):
            raise WaitingForModel(f"waiting for {check.model} on this series", WAIT_SECONDS)
        raise ContentCheckFailed(f"content check: {check.model} did not succeed on this series")
    found = max(float(j.summary["total_volume_ml"]) for j in decided)
    if found < check.min_volume_ml or (check.min_volume_ml == 0 and found <= 0):
        raise ContentCheckFailed(
            f"content check: {check.model} found {found:.1f} mL, "
            f"less than the {check.min_volume_ml:g} mL required"
        )


def check_images(check: ContentCheck, slices: int, normal: np.ndarray) -> None:
    """Require enough slices, and axial ones if the route asks.

    Parameters
    ----------
    check : ContentCheck
        The route's checks.
    slices : int
        The series' slice count.
    normal : np.ndarray
        The slice normal (unit vector, patient coordinates).

    Raises
    ------
    ContentCheckFailed
        Naming what the series lacks.
    """
    if slices < check.min_slices:
        raise ContentCheckFailed(
            f"content check: {slices} slices, fewer than the {check.min_slices} required"
        )
    if check.axial:
        tilt = tilt_degrees(normal)
        if tilt > AXIAL_DEGREES:
            raise ContentCheckFailed(
                f"content check: slices are not axial ({tilt:.0f} degrees from head-foot)"
            )
