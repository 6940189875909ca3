"""Follow-up: today's nodules compared with the prior study's.

For a detection job whose route has priors, once today's findings are known: the prior
series is loaded, its findings taken from this node's earlier job on it (same route,
model and version) or found by running the model on it here, the prior is registered
onto today's scan on the lungs, and the findings are matched
(:mod:`dicomnode.imaging.tracking`). A matched finding keeps the prior's Tracking UID
(the one the route's job on the prior series gives, or would give, its segment); the
comparison goes into the job's summary and the SR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Job, JobState, Series
from dicomnode.db.queries import series_input
from dicomnode.errors import JobError, JobInterrupted, first_line
from dicomnode.imaging import DetectionResult, ModelSpec, Volume, load_series
from dicomnode.imaging.registration import register_rigid
from dicomnode.imaging.tracking import Change, Nodule, compare
from dicomnode.inference import ModelCache
from dicomnode.inference.detect import detect
from dicomnode.outputs import Provenance, segment_tracking_uid
from dicomnode.pipeline.priors import Priors
from dicomnode.send.query import dicom_date
from dicomnode.store import Spool

log = logging.getLogger(__name__)


@dataclass
class FollowUp:
    """The comparison with the prior, as the summary, the SEG and the SR need it.

    Attributes
    ----------
    summary : dict
        For the job's summary (``comparison``): the prior, how it was registered, and
        each nodule's change; or only ``reason`` when there was no comparison.
    tracking_uids : dict[int, str]
        Today's finding number -> the prior finding's Tracking UID, for matched ones.
    heading : str
        What was compared with, or why nothing was (the SR's and ``jobs show``'s line).
    lines : list[str]
        One line per nodule for the SR (no PHI: sizes, dates, UIDs).
    evidence : list[Dataset]
        The prior's source headers: the SR lists them as Pertinent Other Evidence.
    """

    summary: dict[str, Any]
    heading: str
    tracking_uids: dict[int, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    evidence: list[Dataset] = field(default_factory=list)

    @property
    def prior_study_uid(self) -> str | None:
        """Return the prior study compared with, or None."""
        uid = self.summary.get("prior_study_uid")
        return None if uid is None else str(uid)


def no_comparison(reason: str, report: str) -> FollowUp:
    """Return a follow-up that says why there was no comparison.

    ``reason`` is for the job's record; ``report``, a fixed phrase, for the SR.
    """
    return FollowUp({"reason": reason}, f"No comparison: {report}")


def finding_tracking_uid(
    provenance: Provenance, series_uid: str, route: str, model: str, number: int, digest: str
) -> str:
    """Return the Tracking UID a detection job gives finding ``number`` of a series.

    What :func:`dicomnode.outputs.build_segmentation` gives the segment of a finding
    that matched nothing earlier (:func:`dicomnode.outputs.segment_tracking_uid`, the
    job's input digest as the key), for a job whose SEG series is the one the pipeline
    derives from the series, the route and the model.
    """
    seg_series = provenance.uid(series_uid, route, model, "seg")
    return segment_tracking_uid(provenance, seg_series, number, digest)


def _nodules(findings: list[dict[str, Any]]) -> list[Nodule]:
    return [
        Nodule(
            tuple(float(v) for v in f["center_mm"]),  # type: ignore[arg-type]
            float(f["diameter_mm"]),
            # Summaries before the unrounded volume have mL to 0.01 only.
            float(f["volume_mm3"]) / 1000 if f.get("volume_mm3") is not None
            else float(f["volume_ml"] or 0.0),
        )
        for f in findings
    ]  # fmt: skip


def _earlier(
    session: Session, series_id: int, route: str, spec: ModelSpec
) -> tuple[int, list[dict[str, Any]]] | None:
    """Return this node's latest finished job of the route's model on the prior series."""
    series = session.get(Series, series_id)
    if series is None:
        return None
    job = session.scalar(
        select(Job)
        .where(
            Job.series_id == series_id,
            Job.generation == series.generation,
            Job.route == route,
            Job.model == spec.name,
            Job.model_version == spec.version,
            Job.state.in_((JobState.DONE, JobState.SENDING)),
        )
        .order_by(Job.id.desc())
        .limit(1)
    )
    if job is None or "detection" not in (job.summary or {}):
        return None
    return job.id, list(job.summary["detection"]["findings"])


def compare_with_prior(
    *,
    sessions: sessionmaker[Session],
    spool: Spool,
    cache: ModelCache,
    provenance: Provenance,
    route: str,
    spec: ModelSpec,
    mask_spec: ModelSpec,
    volume: Volume,
    findings: list[dict[str, Any]],
    priors: Priors,
    checkpoint: Callable[[], None],
    summarize: Callable[[DetectionResult, Volume], dict[str, Any]],
) -> FollowUp:
    """Compare today's findings with the newest prior's.

    Parameters
    ----------
    sessions, spool, cache, provenance
        The job's database, spool, warm models and UID maker.
    route : str
        The job's route (for the prior's Tracking UIDs).
    spec, mask_spec : ModelSpec
        The detection model and its mask model (run on the prior when needed).
    volume : Volume
        Today's series.
    findings : list[dict]
        Today's findings, as the summary has them (``center_mm``, ``diameter_mm``,
        ``volume_ml``).
    priors : Priors
        What the priors stage found.
    checkpoint : callable
        Raises when the worker must stop.
    summarize : callable
        Turns a detection result into the summary's findings (for the prior's).

    Returns
    -------
    FollowUp
        The comparison, or why there is none.
    """
    if not priors.found:
        return no_comparison(
            priors.record.get("reason") or "no prior study",
            priors.record.get("report") or "no prior study",
        )
    prior = priors.found[0]
    with sessions() as session:
        inputs = series_input(session, prior.series_id)
        earlier = _earlier(session, prior.series_id, route, spec)
    try:
        prior_volume = load_series([spool.absolute(p) for p in inputs.paths])
        checkpoint()
        if earlier is not None:
            source: int | str = earlier[0]
            prior_findings = earlier[1]
        else:
            found = detect(spec, mask_spec, prior_volume, cache, checkpoint=checkpoint)
            source, prior_findings = "this job", summarize(found, prior_volume)["findings"]
        checkpoint()
        transform = register_rigid(volume, prior_volume)
    except JobInterrupted:
        raise
    except Exception as exc:
        # A prior that cannot be loaded, read by the model or registered (a multi-phase
        # series, a missing image) leaves today's results to be made without it.
        why = first_line(str(exc)) if isinstance(exc, JobError | ValueError) else ""
        return no_comparison(
            f"the prior could not be compared ({type(exc).__name__}{': ' + why if why else ''})",
            "the prior study could not be compared",
        )
    before = _nodules(prior_findings)
    carried = [
        Nodule(tuple(transform.to_current(np.array(n.center))[0]), n.diameter_mm, n.volume_ml)
        for n in before
    ]
    today_date = dicom_date(volume.datasets[0].get("StudyDate"))
    changes = compare(_nodules(findings), carried, today_date, prior.study_date)
    # A matched finding keeps the prior's identity: the UID the prior's job gave it
    # (itself kept from an earlier study, perhaps), else the one that job would give.
    tracking = {
        c.current + 1: prior_findings[c.prior].get("tracking_uid")
        or finding_tracking_uid(
            provenance, prior.series_uid, route, spec.name, c.prior + 1, inputs.digest
        )
        for c in changes
        if c.current is not None and c.prior is not None
    }
    interval = (
        None
        if today_date is None or prior.study_date is None
        else (today_date - prior.study_date).days
    )
    nodules = [_change_record(c, findings, prior_findings) for c in changes]
    summary = {
        "prior_study_uid": prior.study_uid,
        "prior_series_uid": prior.series_uid,
        "prior_study_date": None if prior.study_date is None else prior.study_date.isoformat(),
        "interval_days": interval,
        "prior_findings_from": source,
        "registration": {
            "translation_mm": [round(float(v), 1) for v in transform.translation],
            "rotation_degrees": round(transform.rotation_degrees, 2),
        },
        "matched": sum(c.status == "matched" for c in changes),
        "new": sum(c.status == "new" for c in changes),
        "no_longer_seen": sum(c.status == "no longer seen" for c in changes),
        "nodules": nodules,
    }
    when = "date unknown" if prior.study_date is None else prior.study_date.isoformat()
    heading = (
        f"Compared with study {prior.study_uid} ({when}): {summary['matched']} matched, "
        f"{summary['new']} new, {summary['no_longer_seen']} no longer seen"
    )
    return FollowUp(
        summary, heading, tracking, [_line(n) for n in nodules], list(prior_volume.datasets)
    )


def _change_record(
    change: Change, findings: list[dict[str, Any]], prior_findings: list[dict[str, Any]]
) -> dict[str, Any]:
    now = None if change.current is None else findings[change.current]
    then = None if change.prior is None else prior_findings[change.prior]

    def pair(key: str) -> list[float | None]:
        return [None if then is None else then[key], None if now is None else now[key]]

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    return {
        "number": None if change.current is None else change.current + 1,
        "prior_number": None if change.prior is None else change.prior + 1,
        "status": change.status,
        "distance_mm": rounded(change.distance_mm, 1),
        "diameter_mm": pair("diameter_mm"),
        "volume_ml": pair("volume_ml"),
        "volume_change_percent": rounded(change.volume_change_percent, 1),
        "diameter_change_mm": rounded(change.diameter_change_mm, 1),
        "trend": change.trend,
        "doubling_days": rounded(change.doubling_days, 0),
        "note": change.note,
    }


def _line(nodule: dict[str, Any]) -> str:
    """One nodule's change as the SR and ``jobs show`` state it."""
    if nodule["status"] == "new":
        d = nodule["diameter_mm"][1]
        return f"Nodule {nodule['number']}: new ({d:.1f} mm)"
    if nodule["status"] == "no longer seen":
        d = nodule["diameter_mm"][0]
        return f"Prior nodule {nodule['prior_number']} ({d:.1f} mm): no longer seen"
    (d0, d1), (v0, v1) = nodule["diameter_mm"], nodule["volume_ml"]
    text = (
        f"Nodule {nodule['number']} (prior nodule {nodule['prior_number']}): "
        f"{d0:.1f} -> {d1:.1f} mm, {v0:.2f} -> {v1:.2f} mL"
    )
    if nodule["volume_change_percent"] is not None:
        text += f" ({nodule['volume_change_percent']:+.0f}%, {nodule['trend']})"
    if nodule["doubling_days"] is not None:
        text += f", volume doubling time {nodule['doubling_days']:.0f} days"
    else:
        text += f", no volume doubling time: {nodule['note']}"
    return text
