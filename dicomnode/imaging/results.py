"""What a model run found: a series' class, detected objects, and their scores.

Plain data, shared by :mod:`dicomnode.inference` (which makes them) and
:mod:`dicomnode.outputs` (which writes them into SEG and SR objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicomnode.imaging.manifest import ClassSpec


@dataclass
class ClassificationResult:
    """The series' class and the scores behind it.

    Attributes
    ----------
    probabilities : dict[str, float]
        Series-level probability of each class, by label.
    chosen : ClassSpec or None
        The class of the series: the most probable one, or, for a one-class model, that
        class when its probability reaches the threshold (None otherwise).
    per_slice : np.ndarray
        ``(slices, classes)`` probabilities.
    """

    probabilities: dict[str, float]
    chosen: ClassSpec | None
    per_slice: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def probability(self) -> float:
        """Return the probability of the chosen class (of the only class when none is)."""
        if self.chosen is None:
            return next(iter(self.probabilities.values()))
        return self.probabilities[self.chosen.label]


@dataclass
class DetectionResult:
    """Findings above the package's threshold, best first, and what led to them."""

    findings: list[Finding]
    candidates: int
    best_probability: float  # over all candidates; 0 when there were none
    timings: dict[str, float] = field(default_factory=dict)

    def labels(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Return a label volume: finding ``i`` (from 1) where its voxels lie."""
        labels = np.zeros(shape, dtype=np.uint8)
        # Later (weaker) findings never overwrite earlier ones where they touch.
        for number in range(len(self.findings), 0, -1):
            voxels = self.findings[number - 1].voxels
            labels[tuple(voxels.T)] = number
        return labels


@dataclass(frozen=True)
class Finding:
    """One detected object.

    Attributes
    ----------
    center_index : np.ndarray
        ``(3,)`` voxel index ``(slice, row, column)`` of its centre.
    center : np.ndarray
        ``(3,)`` patient coordinates (LPS, mm).
    diameter_mm : float
        Longest axial diameter (the long axis), measured on ``voxels``.
    short_axis_mm : float
        Its width perpendicular to the long axis, on the same slice.
    long_axis_slice : int
        The slice on which the long axis lies.
    probability : float
        The CNN's probability that it is what the package detects.
    voxels : np.ndarray
        ``(m, 3)`` voxel indices of the object, for the SEG and its volume.
    """

    center_index: np.ndarray
    center: np.ndarray
    diameter_mm: float
    short_axis_mm: float
    long_axis_slice: int
    probability: float
    voxels: np.ndarray

    @property
    def slice_index(self) -> int:
        """Return the slice nearest the centre."""
        return round(float(self.center_index[0]))
