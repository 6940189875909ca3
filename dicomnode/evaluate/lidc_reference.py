"""LIDC-IDRI reader annotations as the reference for our nodule SEGs and findings.

Segmentation: the reference is :func:`lidc.nodule_mask` of the outlined consensus
nodules, compared with our SEG segments whose label contains "nodule" (or the one
named), one row per reference nodule (our connected components that touch it) and one
for all nodules together (every false blob counts there).

Detection: the reference nodules are :func:`lidc.consensus_nodules`, by default only
those some reader outlined (>= 3 mm, the LIDC convention for a nodule worth finding).

``min_readers`` means the same for both: a nodule counts when at least that many
readers marked it, and a voxel is reference when at least that many readers put it
inside their outline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dicomnode.errors import EvaluationError, LidcError
from dicomnode.evaluate import lidc
from dicomnode.evaluate.geometry import SourceGrid
from dicomnode.evaluate.scores import score_segmentation
from dicomnode.evaluate.seg_reference import (
    CaseMasks,
    SegmentComparison,
    _source,
    read_seg,
    segment_names,
    stack_segments,
)


@dataclass(frozen=True)
class LidcCase:
    """One LIDC XML file: the series it annotates and its readers' marks."""

    path: Path
    series_uid: str
    marks: list[lidc.ReaderMark]


def read_lidc(path: Path) -> LidcCase:
    """Read an LIDC XML file.

    Parameters
    ----------
    path : Path
        A ``LidcReadMessage`` file.

    Returns
    -------
    LidcCase
        Its series and marks.

    Raises
    ------
    EvaluationError
        If it is not LIDC XML or names no series.
    """
    try:
        series_uid, marks = lidc.read_marks(path)
    except LidcError as exc:
        raise EvaluationError(str(exc)) from None
    if not series_uid:
        raise EvaluationError(f"{path}: the LIDC XML names no SeriesInstanceUid")
    return LidcCase(path, series_uid, marks)


def _check_geometry(case: LidcCase, grid: SourceGrid, source: str) -> dict[str, lidc.Geometry]:
    geometries = grid.geometries()
    missing = {
        roi.sop_uid
        for mark in case.marks
        if mark.kind != "non-nodule"
        for roi in mark.rois
        if roi.sop_uid not in geometries
    }
    if missing:
        raise EvaluationError(
            f"{case.path}: {len(missing)} annotated image(s) are not in {source}; "
            "give the source series with --images"
        )
    return geometries


def reference_nodules(
    case: LidcCase,
    grid: SourceGrid,
    min_readers: int = 1,
    include_small: bool = False,
    source: str = "the source images",
) -> list[lidc.ReferenceNodule]:
    """Return the consensus nodules that count as reference.

    Parameters
    ----------
    case : LidcCase
        The annotations.
    grid : SourceGrid
        The annotated series' grid (every annotated image must be in it).
    min_readers : int
        Nodules marked by fewer readers are left out.
    include_small : bool
        Keep nodules no reader outlined (< 3 mm, point marks).
    source : str
        What the grid came from, for the error message.

    Returns
    -------
    list[ReferenceNodule]
        Most readers first.

    Raises
    ------
    EvaluationError
        If an annotated image is not in the grid.
    """
    nodules = lidc.consensus_nodules(case.marks, _check_geometry(case, grid, source))
    return [n for n in nodules if n.readers >= min_readers and (n.contoured or include_small)]


def _our_numbers(names: dict[int, str], segment: str | None, ours: Path) -> list[int]:
    if segment:
        chosen = [n for n, label in names.items() if label.strip().lower() == segment.lower()]
        what = f"no segment {segment!r}"
    else:
        chosen = [n for n, label in names.items() if "nodule" in label.lower()]
        what = "no nodule segment"
    if not chosen:
        raise EvaluationError(
            f"{ours}: our SEG has {what} (segments: {', '.join(names.values())}); "
            "name one with --segment"
        )
    return chosen


def compare_lidc_case(
    ours: Path,
    case: LidcCase,
    grid: SourceGrid,
    segment: str | None = None,
    min_readers: int = 1,
    source: str = "the source images",
) -> CaseMasks:
    """Score our nodule segment(s) against the readers' outlines.

    Parameters
    ----------
    ours : Path
        Our SEG of the annotated series.
    case : LidcCase
        The annotations.
    grid : SourceGrid
        The series' grid; every annotated image must be in it.
    segment : str, optional
        Our segment to compare (label, case-insensitive); default every segment whose
        label contains "nodule", together.
    min_readers : int
        See the module docstring.
    source : str
        What the grid came from, for error messages.

    Returns
    -------
    CaseMasks
        One row per outlined reference nodule (not averaged), then "all nodules".

    Raises
    ------
    EvaluationError
        If our SEG has no such segment, segments another series, or the grid lacks an
        annotated image.
    """
    seg = read_seg(ours)
    series, _ = _source(seg, ours)
    if series != case.series_uid:
        raise EvaluationError(f"{ours} segments series {series}, {case.path} annotates another")
    numbers = _our_numbers(segment_names(seg), segment, ours)
    nodules = reference_nodules(case, grid, min_readers, source=source)
    ours_mask = np.any(stack_segments(seg, grid.sop_uids, numbers), axis=-1)
    spacing, positions = grid.spacing, list(grid.offsets)
    components, _ = ndimage.label(ours_mask)
    reference = np.zeros_like(ours_mask)
    results = []
    for i, nodule in enumerate(nodules, 1):
        mask = lidc.nodule_mask(nodule.marks, grid.sop_uids, grid.shape, min_readers)
        reference |= mask
        # Ours for this nodule: our connected regions that touch its outline, so that a
        # blob elsewhere in the lung does not count against this nodule's Dice.
        touching = np.unique(components[mask & ours_mask])
        own = np.isin(components, touching[touching > 0])
        results.append(
            SegmentComparison(
                series,
                f"nodule {i} ({nodule.readers} readers, {nodule.diameter_mm:.0f} mm)",
                score_segmentation(own, mask, spacing, positions),
                averaged=False,
            )
        )
    results.append(
        SegmentComparison(
            series, "all nodules", score_segmentation(ours_mask, reference, spacing, positions)
        )
    )
    return CaseMasks(results, ours_mask, reference, grid.sop_uids, grid.files)
