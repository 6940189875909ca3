"""Lung post-processing: keep the lungs, split them into the patient's left and right."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicomnode.imaging import Volume

_BIN_MM = 2.0  # histogram bin width along patient x when looking for the midline


def largest_components(mask: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Label 3D connected components and keep the big ones.

    Parameters
    ----------
    mask : np.ndarray
        Boolean foreground.
    min_fraction : float
        Components smaller than this fraction of the largest are dropped (noise,
        bowel gas, the trachea's stray voxels).

    Returns
    -------
    labels : np.ndarray
        Component labels of the whole mask (int32).
    kept : np.ndarray
        The kept component ids, largest first.
    """
    labels, count = ndimage.label(mask)
    if count == 0:
        return labels, np.array([], dtype=np.int64)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    order = order[sizes[order] > 0]
    kept = order[sizes[order] >= min_fraction * sizes[order[0]]]
    return labels, kept


def _midline_x(x: np.ndarray) -> float:
    """Return the patient-x of the gap between the lungs (the mediastinum).

    The lungs often touch (anterior junction line) and form one component; the
    fewest lung voxels along x in the middle half of the mask's extent marks the
    mediastinum far more reliably than the centroid, since the right lung is larger.
    """
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 4 * _BIN_MM:
        return (lo + hi) / 2
    edges = np.arange(lo, hi + _BIN_MM, _BIN_MM)
    counts, edges = np.histogram(x, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    middle = (centres > lo + 0.25 * (hi - lo)) & (centres < hi - 0.25 * (hi - lo))
    if not middle.any():
        return (lo + hi) / 2
    candidates = np.flatnonzero(middle)
    return float(centres[candidates[np.argmin(counts[candidates])]])


def _main_parts(side: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Keep the largest component of one side, and any piece at least ``fraction`` of it.

    After the cut, what lies on one side besides its lung (gas in the stomach or the
    bowel under the left lung, a stray bronchus) is a separate, clearly smaller piece.
    """
    labels, kept = largest_components(side, fraction)
    return np.isin(labels, kept) if kept.size else side


def split_left_right(
    mask: np.ndarray, volume: Volume, min_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Split a both-lungs mask into the patient's left and right lung.

    Components smaller than ``min_fraction`` of the largest are dropped as noise.
    What remains is cut at the mediastinum, found as the emptiest patient-x position
    in the middle half of the mask (+x is the patient's left in DICOM's LPS system,
    whatever the image orientation). This works whether the lungs are two components
    or fused into one at the anterior junction line. On each side only the main piece
    is kept, so a large gas pocket beside a lung is not reported as lung.

    Parameters
    ----------
    mask : np.ndarray
        Boolean ``(slices, rows, columns)`` lung foreground on the volume's grid.
    volume : Volume
        Its geometry.
    min_fraction : float
        See :func:`largest_components`.

    Returns
    -------
    left, right : np.ndarray
        Boolean masks of the patient's left and right lung.
    """
    labels, kept = largest_components(mask, min_fraction)
    left = np.zeros(mask.shape, dtype=bool)
    right = np.zeros(mask.shape, dtype=bool)
    if kept.size == 0:
        return left, right
    idx = np.argwhere(np.isin(labels, kept))
    x = volume.patient_x(idx)
    is_left = x > _midline_x(x)
    left[tuple(idx[is_left].T)] = True
    right[tuple(idx[~is_left].T)] = True
    return _main_parts(left), _main_parts(right)
