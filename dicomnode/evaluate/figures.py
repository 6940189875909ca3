"""The PNG files of one ``dicomnode evaluate --plots DIR``: what is drawn, and where.

:mod:`dicomnode.evaluate.plots` draws; this module picks the slices, the source
images behind the contours and the file names. matplotlib is imported only when a
plot is drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.evaluate.detection import CPM_RATES, DetectionReport
from dicomnode.evaluate.geometry import SourceGrid
from dicomnode.evaluate.seg_reference import CaseMasks, SegmentComparison


def _images(
    masks: CaseMasks, slices: Iterable[int], grid: SourceGrid | None
) -> dict[int, np.ndarray]:
    files = masks.files or (grid.files if grid is not None else {})
    out = {}
    for k in slices:
        path = files.get(masks.sop_uids[k])
        if path is None:
            continue
        try:
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(
                ds.get("RescaleIntercept", 0)
            )
        except Exception:  # a background is a nicety; the contours still show
            continue
        out[k] = hu
    return out


def plot_case(folder: Path, case: str, masks: CaseMasks, grid: SourceGrid | None) -> Path | None:
    """Draw our contours over the reference's on one case's chosen slices.

    Parameters
    ----------
    folder : Path
        Where the PNG goes, as ``overlay_<series UID>.png``.
    case : str
        The source Series Instance UID.
    masks : CaseMasks
        The compared masks.
    grid : SourceGrid or None
        The source geometry, whose files give the slices' images when the masks
        name none.

    Returns
    -------
    Path or None
        The file written, or None when there was nothing to draw.
    """
    from dicomnode.evaluate.plots import overlay_slices, plot_overlay

    path = folder / f"overlay_{case}.png"
    chosen = overlay_slices(masks.ours, masks.reference)
    if plot_overlay(
        masks.ours,
        masks.reference,
        path,
        _images(masks, chosen, grid),
        title=f"...{case[-12:]}",
    ):
        return path
    return None


def plot_summaries(
    folder: Path, segmentation: Sequence[SegmentComparison], detection: DetectionReport | None
) -> list[Path]:
    """Draw the Dice bars, and the ROC and FROC curves of a detection.

    Parameters
    ----------
    folder : Path
        Where the PNGs go: ``dice.png``, ``roc.png``, ``froc.png``.
    segmentation : Sequence[SegmentComparison]
        The comparisons; those not averaged are left out of the bars.
    detection : DetectionReport or None
        The detection metrics; no ROC without an AUC, no curves without it.

    Returns
    -------
    list[Path]
        The files written, in that order.
    """
    from dicomnode.evaluate.plots import plot_dice, plot_froc, plot_roc

    written = []
    rows = [r for r in segmentation if r.averaged]
    if rows:
        path = folder / "dice.png"
        plot_dice(
            [f"...{r.case[-8:]} {r.segment}" for r in rows], [r.scores.dice for r in rows], path
        )
        written.append(path)
    if detection is None:
        return written
    if detection.auc is not None:
        path = folder / "roc.png"
        plot_roc(detection.labels, detection.scores, path)
        written.append(path)
    fps, sens = detection.froc
    path = folder / "froc.png"
    plot_froc(fps, sens, path, CPM_RATES, [detection.cpm_sensitivities[r] for r in CPM_RATES])
    written.append(path)
    return written
