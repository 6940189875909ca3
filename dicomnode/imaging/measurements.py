"""Per-segment measurements from a label map and the rescaled volume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LAA_THRESHOLD = -950.0  # HU; the usual emphysema threshold on CT


@dataclass(frozen=True)
class SegmentStats:
    """Measurements of one segment."""

    number: int  # segment number = label value
    label: str
    voxels: int
    volume_ml: float
    mean: float  # mean rescaled value (HU for CT); NaN for an empty segment
    std: float
    below_950: float = float("nan")  # % of voxels below -950 (%LAA-950 for lungs); NaN if empty


def segment_stats(
    labels: np.ndarray, pixels: np.ndarray, voxel_volume_ml: float, names: Sequence[str]
) -> list[SegmentStats]:
    """Measure every segment of a label map in one pass.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, 0 background and ``i`` for ``names[i-1]``.
    pixels : np.ndarray
        Rescaled values on the same grid.
    voxel_volume_ml : float
        Volume of one voxel.
    names : Sequence[str]
        Segment labels in label order.

    Returns
    -------
    list[SegmentStats]
        One entry per name, in order.
    """
    n = len(names) + 1
    flat = labels.ravel().astype(np.intp)
    values = pixels.ravel().astype(np.float64)
    counts = np.bincount(flat, minlength=n)
    sums = np.bincount(flat, weights=values, minlength=n)
    squares = np.bincount(flat, weights=values * values, minlength=n)
    # Emphysema index: voxels below -950 HU (LAA = low attenuation area).
    low = np.bincount(flat, weights=(values < LAA_THRESHOLD).astype(np.float64), minlength=n)
    out = []
    for number, name in enumerate(names, start=1):
        count = int(counts[number])
        if count:
            mean = sums[number] / count
            var = max(squares[number] / count - mean * mean, 0.0)
            std = float(np.sqrt(var))
            below = 100.0 * low[number] / count
        else:
            mean, std, below = float("nan"), float("nan"), float("nan")
        out.append(
            SegmentStats(
                number=number,
                label=name,
                voxels=count,
                volume_ml=count * voxel_volume_ml,
                mean=float(mean),
                std=std,
                below_950=float(below),
            )
        )
    return out
