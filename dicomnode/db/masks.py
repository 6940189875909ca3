"""Find a mask another job already made on a series, for a job that needs the same mask.

A detection model bounds its search with a segmentation model's mask (the lung
U-Net's lungs); a route that runs that segmentation model on the same series has
usually just written that very mask as its SEG. Reading it back is much cheaper
than running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db.models import Job, Output


@dataclass(frozen=True)
class MaskOutput:
    """A SEG a job recorded, and the job that made it."""

    job_id: int
    path: str  # relative to the spool root


def find_mask(
    session: Session, *, series_id: int, generation: int, model: str, version: str
) -> MaskOutput | None:
    """Return the latest SEG made by ``model`` ``version`` on this series generation.

    Only a job of the same generation counts: a late instance re-opens the series,
    and a mask of the earlier generation lacks it. A recorded SEG is whole (outputs
    are written, validated and recorded before they are sent), so the job's state
    does not matter: one whose delivery failed or waits for a retry made the same
    mask as one that is done.

    Parameters
    ----------
    session : Session
        A database session.
    series_id, generation : int
        The series and its generation.
    model, version : str
        The mask model and the version whose masks are wanted.

    Returns
    -------
    MaskOutput or None
        The newest such SEG (two routes may run the model with different encodings;
        either holds the same labels), or None if no job recorded one.
    """
    row = session.execute(
        select(Output.job_id, Output.path)
        .join(Job, Output.job_id == Job.id)
        .where(
            Job.series_id == series_id,
            Job.generation == generation,
            Job.model == model,
            Job.model_version == version,
            Output.kind == "seg",
        )
        .order_by(Output.id.desc())
        .limit(1)
    ).first()
    return None if row is None else MaskOutput(job_id=row.job_id, path=row.path)
