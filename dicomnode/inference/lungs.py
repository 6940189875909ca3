"""Lung post-processing: keep the lungs, split them into the patient's left and right."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicomnode.inference.volume import Volume

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


def split_left_right(
    mask: np.ndarray, volume: Volume, min_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Split a both-lungs mask into the patient's left and right lung.

    Small components are dropped first. When two large components remain they are
    the two lungs, told apart by their mean patient-space x (+x is the patient's
    left in DICOM's LPS system, whatever the image orientation). When they are
    fused into one, the mask is cut at the mediastinum.

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
    keep = np.isin(labels, kept)
    idx = np.argwhere(keep)
    x = volume.patient_x(idx)
    if kept.size >= 2:
        # Two lungs: the two biggest components; any smaller kept piece joins the
        # lung on its side of the midline between them.
        comp = labels[keep]
        mean_a = x[comp == kept[0]].mean()
        mean_b = x[comp == kept[1]].mean()
        split = (mean_a + mean_b) / 2
        side = np.zeros(int(labels.max()) + 1, dtype=bool)
        for c in kept:
            side[c] = x[comp == c].mean() > split
        is_left = side[comp]
    else:
        is_left = x > _midline_x(x)
    left[tuple(idx[is_left].T)] = True
    right[tuple(idx[~is_left].T)] = True
    return left, right
