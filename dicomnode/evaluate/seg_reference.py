"""Compare a SEG we produced with a reference SEG of the same source series.

Both are read with highdicom and laid on the grid of the source instances they
reference, segment by segment; segments are paired by their label (case-insensitive),
so a reference made in 3D Slicer or by another tool can be used as long as it names
its segments the same way. Voxel spacing comes from the SEG's pixel measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np

from dicomnode.errors import EvaluationError
from dicomnode.evaluate.scores import SegmentationScores, score_segmentation


@dataclass(frozen=True)
class SegmentComparison:
    """One segment (or all of them together) of one case."""

    case: str  # the source series UID
    segment: str  # the label, or "all segments"
    scores: SegmentationScores
    averaged: bool = True  # False: a detail row (one nodule) left out of the means


@dataclass(frozen=True)
class CaseMasks:
    """One case's comparisons with the masks they were computed on (for plots)."""

    results: list[SegmentComparison]
    ours: np.ndarray  # (slices, rows, columns): the compared segments together
    reference: np.ndarray
    sop_uids: list[str]  # source instance of each slice ("" where unknown)
    files: dict[str, Path] = field(default_factory=dict)  # source image files by SOP UID


def read_seg(path: Path) -> hd.seg.Segmentation:
    """Read a DICOM SEG, or raise :class:`EvaluationError` naming the file.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    highdicom.seg.Segmentation
        The SEG.
    """
    return _read(path)


def segment_names(seg: hd.seg.Segmentation) -> dict[int, str]:
    """Return each segment's label by segment number.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The SEG.

    Returns
    -------
    dict[int, str]
        Labels as written.
    """
    return {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}


def score_masks(
    case: str,
    names: Sequence[str],
    ours: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    positions: Sequence[float],
    together: str = "all segments",
) -> list[SegmentComparison]:
    """Score each segment's masks, then all of them together.

    Parameters
    ----------
    case : str
        The source series UID.
    names : sequence of str
        One label per segment (last axis of the masks).
    ours, reference : np.ndarray
        ``(slices, rows, columns, segments)`` booleans on one grid.
    spacing : sequence of float
        (slice gap, row spacing, column spacing) in mm.
    positions : sequence of float
        Each slice's offset along the normal, for HD95 across uneven gaps.
    together : str
        Label of the row for all segments together; no such row if empty or if
        there is only one segment.

    Returns
    -------
    list[SegmentComparison]
        One per segment, then the combined one.
    """
    out = [
        SegmentComparison(
            case, name, score_segmentation(ours[..., i], reference[..., i], spacing, positions)
        )
        for i, name in enumerate(names)
    ]
    if together and (len(names) > 1 or together == "all segments"):
        out.append(
            SegmentComparison(
                case,
                together,
                score_segmentation(
                    np.any(ours, axis=-1), np.any(reference, axis=-1), spacing, positions
                ),
            )
        )
    return out


def _read(path: Path) -> hd.seg.Segmentation:
    try:
        return hd.seg.segread(path)
    except Exception as exc:
        raise EvaluationError(f"{path}: not a readable DICOM SEG ({type(exc).__name__})") from None


def _source(seg: hd.seg.Segmentation, path: Path) -> tuple[str, list[str]]:
    series = seg.get("ReferencedSeriesSequence")
    if not series:
        raise EvaluationError(f"{path}: the SEG names no source series")
    uids = [str(i.ReferencedSOPInstanceUID) for i in series[0].ReferencedInstanceSequence]
    return str(series[0].SeriesInstanceUID), uids


def _spacing(seg: hd.seg.Segmentation, path: Path) -> tuple[float, float, float]:
    try:
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        rows, cols = (float(v) for v in measures.PixelSpacing)
        between = measures.get("SpacingBetweenSlices") or measures.get("SliceThickness")
        return float(between), rows, cols
    except (AttributeError, IndexError, TypeError, ValueError):
        raise EvaluationError(f"{path}: the SEG has no usable pixel measures") from None


def _slice_offsets(seg: hd.seg.Segmentation) -> dict[str, float]:
    """Return each framed source instance's position along the slice normal, in mm."""
    try:
        shared = seg.SharedFunctionalGroupsSequence[0]
        orientation = np.array(
            shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float
        )
    except (AttributeError, IndexError):
        return {}
    normal = np.cross(orientation[:3], orientation[3:])
    out: dict[str, float] = {}
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        try:
            position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
            for derivation in frame.DerivationImageSequence:
                for source in derivation.SourceImageSequence:
                    out[str(source.ReferencedSOPInstanceUID)] = float(position @ normal)
        except (AttributeError, IndexError):
            continue
    return out


def _labels(seg: hd.seg.Segmentation) -> dict[str, int]:
    return {
        str(item.SegmentLabel).strip().lower(): int(item.SegmentNumber)
        for item in seg.SegmentSequence
    }


def compare_segs(ours: Path, reference: Path) -> list[SegmentComparison]:
    """Score each segment of ``ours`` against the same-named segment of ``reference``.

    Parameters
    ----------
    ours, reference : Path
        SEG files of the same source series.

    Returns
    -------
    list[SegmentComparison]
        One entry per segment found in both, then one for all of them together.

    Raises
    ------
    EvaluationError
        If a file is not a SEG, the two segment different series, or they share no
        segment label.
    """
    return compare_seg_case(ours, reference).results


def compare_seg_case(ours: Path, reference: Path) -> CaseMasks:
    """Do what :func:`compare_segs` does, keeping the masks (see there).

    Parameters
    ----------
    ours, reference : Path
        SEG files of the same source series.

    Returns
    -------
    CaseMasks
        The comparisons and the masks of all shared segments together.
    """
    a, b = _read(ours), _read(reference)
    series_a, uids_a = _source(a, ours)
    series_b, uids_b = _source(b, reference)
    if series_a != series_b:
        raise EvaluationError(f"{ours} segments series {series_a}, {reference} segments {series_b}")
    # Slices in body order, by where the frames of either SEG say each source lies;
    # a source with frames in neither SEG is empty in both and left out, its gap kept
    # by the real positions.
    offsets = {**_slice_offsets(b), **_slice_offsets(a)}
    uids = sorted((u for u in set(uids_a) | set(uids_b) if u in offsets), key=offsets.__getitem__)
    if not uids:
        raise EvaluationError(f"{ours} and {reference} have no frames to compare")
    positions = [offsets[u] for u in uids]
    labels_a, labels_b = _labels(a), _labels(b)
    shared = [label for label in labels_a if label in labels_b]
    if not shared:
        raise EvaluationError(
            f"no segment label in common: {sorted(labels_a)} against {sorted(labels_b)}"
        )
    mask_a = stack_segments(a, uids, [labels_a[label] for label in shared])
    mask_b = stack_segments(b, uids, [labels_b[label] for label in shared])
    spacing = _spacing(b, reference)
    if len(positions) > 1:
        gaps = np.diff(positions)
        spacing = (float(np.median(gaps)), spacing[1], spacing[2])
    names = segment_names(a)
    results = score_masks(
        series_a, [names[labels_a[label]] for label in shared], mask_a, mask_b, spacing, positions
    )
    return CaseMasks(results, np.any(mask_a, axis=-1), np.any(mask_b, axis=-1), uids)


def stack_segments(
    seg: hd.seg.Segmentation, uids: Sequence[str], numbers: Sequence[int]
) -> np.ndarray:
    """Return ``(sources, rows, columns, segments)`` booleans; absent frames are empty.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The SEG.
    uids : sequence of str
        Source SOP Instance UIDs, one per slice wanted; one the SEG does not reference
        (or "") gives an empty slice.
    numbers : sequence of int
        Segment numbers, one per mask.

    Returns
    -------
    np.ndarray
        The masks.
    """
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    present = [u for u in uids if u in referenced]
    if not present or not numbers:
        return np.zeros((len(uids), int(seg.Rows), int(seg.Columns), len(numbers)), dtype=bool)
    pixels: Any = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=present,
        segment_numbers=numbers,
        combine_segments=False,
        assert_missing_frames_are_empty=True,
    )
    out = np.zeros((len(uids), *pixels.shape[1:]), dtype=bool)
    index = {u: i for i, u in enumerate(uids)}
    for k, uid in enumerate(present):
        out[index[uid]] = pixels[k] > 0
    return out
