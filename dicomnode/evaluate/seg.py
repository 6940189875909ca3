"""Compare a SEG we produced with a reference SEG of the same source series.

Both are read with highdicom and laid on the grid of the source instances they
reference, segment by segment; segments are paired by their label (case-insensitive),
so a reference made in 3D Slicer or by another tool can be used as long as it names
its segments the same way. Voxel spacing comes from the SEG's pixel measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np

from dicomnode.errors import DicomnodeError
from dicomnode.evaluate.metrics import SegmentationScores, score_segmentation


class EvaluationError(DicomnodeError):
    """A case that cannot be compared: one line, naming the file and the problem."""


@dataclass(frozen=True)
class SegmentComparison:
    """One segment (or all of them together) of one case."""

    case: str  # the source series UID
    segment: str  # the label, or "all segments"
    scores: SegmentationScores


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
    mask_a = _stack(a, uids, [labels_a[label] for label in shared])
    mask_b = _stack(b, uids, [labels_b[label] for label in shared])
    spacing = _spacing(b, reference)
    if len(positions) > 1:
        gaps = np.diff(positions)
        spacing = (float(np.median(gaps)), spacing[1], spacing[2])
    names = {n: str(s.SegmentLabel) for s in a.SegmentSequence for n in [int(s.SegmentNumber)]}
    out = [
        SegmentComparison(
            series_a,
            names[labels_a[label]],
            score_segmentation(mask_a[..., i], mask_b[..., i], spacing, positions),
        )
        for i, label in enumerate(shared)
    ]
    out.append(
        SegmentComparison(
            series_a,
            "all segments",
            score_segmentation(
                np.any(mask_a, axis=-1), np.any(mask_b, axis=-1), spacing, positions
            ),
        )
    )
    return out


def _stack(seg: hd.seg.Segmentation, uids: list[str], numbers: list[int]) -> np.ndarray:
    """Return ``(sources, rows, columns, segments)`` booleans; absent frames are empty."""
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    present = [u for u in uids if u in referenced]
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
