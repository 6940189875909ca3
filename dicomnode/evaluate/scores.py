"""Metrics a user checks a model with: overlap, distance, detection and classification.

Plain numpy and scipy on boolean masks and score arrays, so that ``dicomnode
evaluate`` and the model cards compute them the same way. Distances are in
millimetres: masks come with their voxel spacing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, spatial


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Return the Dice coefficient of two masks (1.0 when both are empty).

    Parameters
    ----------
    a, b : np.ndarray
        Boolean masks of the same shape.

    Returns
    -------
    float
        ``2 |a & b| / (|a| + |b|)``.
    """
    a, b = _masks(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union (Jaccard index) of two masks (1.0 if both empty).

    Parameters
    ----------
    a, b : np.ndarray
        Boolean masks of the same shape.

    Returns
    -------
    float
        ``|a & b| / |a | b|``.
    """
    a, b = _masks(a, b)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def hausdorff95(
    a: np.ndarray,
    b: np.ndarray,
    spacing: Sequence[float],
    slice_positions: Sequence[float] | None = None,
) -> float:
    """Return the 95th percentile symmetric surface distance in millimetres.

    Parameters
    ----------
    a, b : np.ndarray
        Boolean masks of the same shape.
    spacing : sequence of float
        Voxel size along each axis, in mm.
    slice_positions : sequence of float, optional
        Where each slice (first axis) lies along the slice normal, in mm, when the
        gaps are not all ``spacing[0]`` (slices missing from both masks, say).

    Returns
    -------
    float
        The 95th percentile of the distances from each surface voxel of one mask to
        the other mask's surface, both ways; 0.0 if both are empty, infinity if only
        one is.
    """
    a, b = _masks(a, b)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    surface_a, surface_b = _surface(a), _surface(b)
    if slice_positions is not None:
        points_a = _points(surface_a, spacing, slice_positions)
        points_b = _points(surface_b, spacing, slice_positions)
        d_ab, _ = spatial.cKDTree(points_b).query(points_a)
        d_ba, _ = spatial.cKDTree(points_a).query(points_b)
        return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    distances = np.concatenate([to_b[surface_a], to_a[surface_b]])
    return float(np.percentile(distances, 95))


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Return a mask's volume in millilitres.

    Parameters
    ----------
    mask : np.ndarray
        Boolean mask.
    spacing : sequence of float
        Voxel size in mm.

    Returns
    -------
    float
        Voxel count times voxel volume, in mL.
    """
    return float(mask.astype(bool).sum() * np.prod(spacing) / 1000.0)


@dataclass(frozen=True)
class SegmentationScores:
    """How one predicted mask compares with its reference."""

    dice: float
    iou: float
    hausdorff95_mm: float
    volume_ml: float
    reference_volume_ml: float

    @property
    def volume_difference_ml(self) -> float:
        """Predicted minus reference volume."""
        return self.volume_ml - self.reference_volume_ml

    @property
    def volume_difference_percent(self) -> float:
        """The difference relative to the reference volume (inf if that is empty)."""
        if self.reference_volume_ml == 0:
            return 0.0 if self.volume_ml == 0 else float("inf")
        return 100.0 * self.volume_difference_ml / self.reference_volume_ml


def score_segmentation(
    predicted: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    slice_positions: Sequence[float] | None = None,
) -> SegmentationScores:
    """Compute every segmentation metric for one mask.

    Parameters
    ----------
    predicted, reference : np.ndarray
        Boolean masks on the same grid.
    spacing : sequence of float
        Voxel size in mm.
    slice_positions : sequence of float, optional
        Each slice's position along the normal, for uneven gaps (see :func:`hausdorff95`).

    Returns
    -------
    SegmentationScores
        Dice, IoU, HD95 and both volumes.
    """
    return SegmentationScores(
        dice=dice(predicted, reference),
        iou=iou(predicted, reference),
        hausdorff95_mm=hausdorff95(predicted, reference, spacing, slice_positions),
        volume_ml=volume_ml(predicted, spacing),
        reference_volume_ml=volume_ml(reference, spacing),
    )


@dataclass(frozen=True)
class DetectionScores:
    """Counts and rates of a detector or a binary classifier."""

    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @property
    def sensitivity(self) -> float:
        """Recall: found / present (0.0 when nothing was present)."""
        present = self.true_positives + self.false_negatives
        return self.true_positives / present if present else 0.0

    @property
    def precision(self) -> float:
        """Correct / reported (0.0 when nothing was reported)."""
        reported = self.true_positives + self.false_positives
        return self.true_positives / reported if reported else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and sensitivity."""
        p, r = self.precision, self.sensitivity
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def accuracy(self) -> float:
        """Correct decisions / all decisions (true negatives count only for classifiers)."""
        total = self.true_positives + self.false_positives + self.false_negatives
        total += self.true_negatives
        correct = self.true_positives + self.true_negatives
        return correct / total if total else 0.0


def confusion(labels: Sequence[bool], predictions: Sequence[bool]) -> DetectionScores:
    """Count a binary classifier's decisions against the truth.

    Parameters
    ----------
    labels : sequence of bool
        The truth per case.
    predictions : sequence of bool
        The decisions per case.

    Returns
    -------
    DetectionScores
        The four counts.
    """
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(predictions, dtype=bool)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    return DetectionScores(
        true_positives=int((y & p).sum()),
        false_positives=int((~y & p).sum()),
        false_negatives=int((y & ~p).sum()),
        true_negatives=int((~y & ~p).sum()),
    )


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Return the area under the ROC curve (ties count half).

    Parameters
    ----------
    labels : sequence of bool
        The truth per case; both classes must occur.
    scores : sequence of float
        Higher means more likely positive.

    Returns
    -------
    float
        The probability that a random positive scores above a random negative.

    Raises
    ------
    ValueError
        If only one class is present.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    positives, negatives = s[y], s[~y]
    if positives.size == 0 or negatives.size == 0:
        raise ValueError("AUC needs both positive and negative cases")
    # Mann-Whitney U from average ranks: ties get the mean rank, i.e. count half.
    ranks = _average_ranks(np.concatenate([positives, negatives]))
    u = ranks[: positives.size].sum() - positives.size * (positives.size + 1) / 2
    return float(u / (positives.size * negatives.size))


def roc_curve(labels: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Return the ROC curve's false and true positive rates, from (0, 0) to (1, 1).

    Parameters
    ----------
    labels : sequence of bool
        The truth per case; both classes must occur.
    scores : sequence of float
        Higher means more likely positive.

    Returns
    -------
    tuple of np.ndarray
        ``(fpr, tpr)``, one point per distinct score threshold.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs both positive and negative cases")
    thresholds = np.unique(s)[::-1]
    tpr = [0.0] + [float((s[y] >= t).mean()) for t in thresholds]
    fpr = [0.0] + [float((s[~y] >= t).mean()) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=float)
    sorted_values = values[order]
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _masks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    return a, b


def _points(
    surface: np.ndarray, spacing: Sequence[float], slice_positions: Sequence[float]
) -> np.ndarray:
    idx = np.argwhere(surface).astype(float)
    z = np.asarray(slice_positions, dtype=float)[idx[:, 0].astype(int)]
    return np.column_stack([z, idx[:, 1] * spacing[1], idx[:, 2] * spacing[2]])


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)
