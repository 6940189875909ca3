"""The preview of a job: find its SEG and source series in the spool and draw them.

``dicomnode jobs show ID --preview out.png`` calls :func:`render_job_preview` with what
:func:`dicomnode.db.queries.preview_source` read; the drawing itself is
:func:`dicomnode.outputs.preview.preview_montage`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import highdicom as hd

from dicomnode.errors import PreviewError
from dicomnode.imaging import load_series
from dicomnode.outputs.preview import preview_montage

if TYPE_CHECKING:
    from PIL import Image

    from dicomnode.db import JobDetail, PreviewSource
    from dicomnode.store import Spool


def preview_seg_path(source: PreviewSource) -> str:
    """Return the spool path of the job's SEG output.

    Parameters
    ----------
    source : PreviewSource
        The job and what a preview of it reads.

    Returns
    -------
    str
        The path of the newest SEG of the job, relative to the spool.

    Raises
    ------
    PreviewError
        If the job has none (not run yet, or nothing was segmented).
    """
    if source.seg_path is None:
        job = source.detail.job
        raise PreviewError(
            f"job {job.id} has no SEG output yet (state {job.state}); nothing to preview"
        )
    return source.seg_path


def headline(detail: JobDetail) -> list[str]:
    """Return the header lines of a job's preview: the job and its key result.

    Parameters
    ----------
    detail : JobDetail
        The job.

    Returns
    -------
    list[str]
        The job's id, model and state, then its findings or its total segment volume
        when the summary has them, and the comparison with a prior; no patient data.
    """
    job, summary = detail.job, detail.summary
    lines = [f"job {job.id}  {job.model} {job.model_version}  ({job.state})"]
    detection = summary.get("detection")
    if detection is not None:
        found = len(detection.get("findings", []))
        best = detection.get("best_probability")
        lines.append(
            f"{found} finding(s) of {detection.get('candidates', '?')} candidates"
            + ("" if best is None else f", best probability {best:.2f}")
        )
    elif "total_volume_ml" in summary:
        lines.append(f"total segment volume {summary['total_volume_ml']:.1f} mL")
    comparison = summary.get("comparison")
    if comparison is not None and "prior_study_uid" in comparison:
        lines.append(
            f"vs prior of {comparison.get('prior_study_date') or 'unknown date'}: "
            f"{comparison['matched']} matched, {comparison['new']} new, "
            f"{comparison['no_longer_seen']} no longer seen"
        )
    elif comparison is not None:
        lines.append(f"no comparison: {comparison['reason']}"[:90])
    return lines


def render_job_preview(spool: Spool, source: PreviewSource) -> tuple[Image.Image, int]:
    """Draw the montage of a job's SEG over its source series.

    Parameters
    ----------
    spool : Spool
        Where the SEG and the source instances lie.
    source : PreviewSource
        The job, its SEG (:func:`preview_seg_path`) and its source instances.

    Returns
    -------
    tuple[PIL.Image.Image, int]
        The montage and how many slices it shows.

    Raises
    ------
    PreviewError
        If the job has no SEG, or the SEG or the source images are gone from the spool.
    """
    job = source.detail.job
    paths = [spool.absolute(p) for p in source.instance_paths]
    seg_file = spool.absolute(preview_seg_path(source))
    # Retention or a purge may have removed files the database still lists: one line
    # that says so, rather than a reader's error on the first missing one.
    missing = [p for p in [seg_file, *paths] if not p.is_file()]
    if missing or not paths:
        raise PreviewError(
            f"job {job.id}: {len(missing)} of its files are no longer in the spool"
            if missing
            else f"job {job.id}: its series has no instances left"
        )
    volume = load_series(paths)
    seg = hd.seg.segread(seg_file)
    return preview_montage(seg, volume, source.detail.summary, headline(source.detail))
