"""Detection metrics: predicted findings against reference nodules, per scan and overall.

Matching rule
-------------
Within one scan the predictions are visited from the most to the least probable (ties
in input order). Each is matched to the *nearest still unmatched* reference nodule if
its centre lies within ``max(reference diameter / 2, 5 mm)`` of that nodule's centre
(Euclidean, patient coordinates); otherwise it is a false positive. A second
prediction on an already matched nodule is therefore a false positive unless another
unmatched nodule is within reach. The 5 mm floor keeps point-marked or tiny nodules
(diameter 0) matchable.

Visiting in probability order makes the matching at any threshold a prefix of the
matching of all predictions, so it is computed once and every threshold, the FROC
curve and the candidate AUC read the same true/false labels.

Sensitivity at a false-positive rate is the highest sensitivity of an operating point
(a threshold) whose mean false positives per scan do not exceed that rate: a step
function, not the linear interpolation of the LUNA16 script, so every reported
number is a threshold one could actually choose. The CPM is the mean over the seven
LUNA16 rates 1/8 ... 8 FP per scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dicomnode.evaluate.scores import DetectionScores, roc_auc

CPM_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MIN_MATCH_RADIUS_MM = 5.0


@dataclass(frozen=True)
class Finding:
    """One predicted finding: where, how large and how likely."""

    center: np.ndarray  # patient coordinates (LPS, mm), shape (3,)
    diameter_mm: float
    probability: float


class Nodule(Protocol):
    """What a reference nodule needs for matching (``lidc.ReferenceNodule`` has it)."""

    @property
    def center(self) -> np.ndarray:  # noqa: D102
        ...

    @property
    def diameter_mm(self) -> float:  # noqa: D102
        ...


def match_radius(nodule: Nodule) -> float:
    """Return how far (mm) a prediction's centre may lie from ``nodule``'s centre.

    Parameters
    ----------
    nodule : Nodule
        A reference nodule.

    Returns
    -------
    float
        ``max(diameter / 2, 5 mm)``.
    """
    return max(float(nodule.diameter_mm) / 2.0, MIN_MATCH_RADIUS_MM)


def match_findings(findings: Sequence[Finding], nodules: Sequence[Nodule]) -> list[int | None]:
    """Match one scan's predictions to its reference nodules (see the module's rule).

    Parameters
    ----------
    findings : sequence of Finding
        The scan's predictions.
    nodules : sequence of Nodule
        The scan's reference nodules.

    Returns
    -------
    list of int or None
        For each finding (input order), the index of the nodule it found, or None
        for a false positive.
    """
    order = sorted(range(len(findings)), key=lambda i: -float(findings[i].probability))
    centers = np.array([np.asarray(n.center, float) for n in nodules]).reshape(-1, 3)
    radii = np.array([match_radius(n) for n in nodules])
    free = np.ones(len(nodules), dtype=bool)
    out: list[int | None] = [None] * len(findings)
    for i in order:
        if not free.any():
            break
        distance = np.linalg.norm(centers - np.asarray(findings[i].center, float), axis=1)
        distance[~free] = np.inf
        j = int(np.argmin(distance))
        if distance[j] <= radii[j]:
            out[i] = j
            free[j] = False
    return out


@dataclass(frozen=True)
class OperatingPoint:
    """Counts and rates when findings with ``probability >= threshold`` are kept."""

    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int
    fp_per_scan: float

    @property
    def scores(self) -> DetectionScores:
        """The counts as :class:`DetectionScores` (no true negatives for a detector)."""
        return DetectionScores(self.true_positives, self.false_positives, self.false_negatives, 0)

    @property
    def sensitivity(self) -> float:
        """Found nodules / reference nodules."""
        return self.scores.sensitivity

    @property
    def precision(self) -> float:
        """True / kept findings."""
        return self.scores.precision

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and sensitivity."""
        return self.scores.f1


@dataclass(frozen=True)
class CaseDetection:
    """One scan at the chosen threshold."""

    case: str
    nodules: int
    findings: int  # all predictions, whatever their probability
    scores: DetectionScores  # at the chosen threshold


@dataclass(frozen=True)
class DetectionReport:
    """Everything :func:`evaluate_detection` computes."""

    threshold: float
    cases: list[CaseDetection]
    total: DetectionScores  # at ``threshold``, summed over scans
    curve: list[OperatingPoint]  # one per distinct probability, highest first
    cpm_sensitivities: dict[float, float]
    cpm: float
    auc: float | None  # candidate level; None unless both classes occur
    labels: list[bool] = field(repr=False)  # per finding: matched a nodule
    scores: list[float] = field(repr=False)  # per finding: probability

    @property
    def froc(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(mean FP per scan, sensitivity)`` from (0, 0) over every threshold."""
        fps = [0.0] + [p.fp_per_scan for p in self.curve]
        sens = [0.0] + [p.sensitivity for p in self.curve]
        return np.asarray(fps), np.asarray(sens)


def operating_points(
    labels: Sequence[bool], scores: Sequence[float], nodules: int, scans: int
) -> list[OperatingPoint]:
    """Return the operating point at every distinct score, highest first.

    Parameters
    ----------
    labels : sequence of bool
        Per finding: whether it matched a nodule (each match a different nodule).
    scores : sequence of float
        Per finding: its probability.
    nodules : int
        Reference nodules over all scans.
    scans : int
        Scans evaluated (those without predictions or nodules included).

    Returns
    -------
    list[OperatingPoint]
        Counts at each threshold.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    out = []
    for t in np.unique(s)[::-1]:
        kept = s >= t
        tp = int((kept & y).sum())
        fp = int((kept & ~y).sum())
        out.append(OperatingPoint(float(t), tp, fp, nodules - tp, fp / scans if scans else 0.0))
    return out


def sensitivity_at(curve: Sequence[OperatingPoint], rate: float) -> float:
    """Return the best sensitivity with at most ``rate`` mean false positives per scan.

    Parameters
    ----------
    curve : sequence of OperatingPoint
        From :func:`operating_points`.
    rate : float
        False positives per scan.

    Returns
    -------
    float
        0.0 if no threshold keeps the false positives that low.
    """
    return max((p.sensitivity for p in curve if p.fp_per_scan <= rate), default=0.0)


def evaluate_detection(
    predictions: Mapping[str, Sequence[Finding]],
    references: Mapping[str, Sequence[Nodule]],
    threshold: float = 0.5,
) -> DetectionReport:
    """Score a detector over scans: per-threshold counts, FROC, CPM and candidate AUC.

    Parameters
    ----------
    predictions : mapping
        Findings by case (series UID); a case without an entry has no findings.
    references : mapping
        Reference nodules by case; its keys are the scans evaluated.
    threshold : float
        Probability at and above which a finding counts, for the per-case and total
        counts.

    Returns
    -------
    DetectionReport
        See its fields.

    Raises
    ------
    ValueError
        If ``predictions`` names a case that ``references`` lacks.
    """
    unknown = sorted(set(predictions) - set(references))
    if unknown:
        raise ValueError(f"findings for {len(unknown)} case(s) without a reference")
    labels: list[bool] = []
    scores: list[float] = []
    cases = []
    for case, nodules in references.items():
        findings = list(predictions.get(case, []))
        matched = match_findings(findings, nodules)
        own_labels = [m is not None for m in matched]
        own_scores = [float(f.probability) for f in findings]
        labels += own_labels
        scores += own_scores
        kept = [lab for lab, s in zip(own_labels, own_scores, strict=True) if s >= threshold]
        tp = sum(kept)
        cases.append(
            CaseDetection(
                case=case,
                nodules=len(nodules),
                findings=len(findings),
                scores=DetectionScores(tp, len(kept) - tp, len(nodules) - tp, 0),
            )
        )
    total_nodules = sum(c.nodules for c in cases)
    curve = operating_points(labels, scores, total_nodules, len(cases))
    at = {rate: sensitivity_at(curve, rate) for rate in CPM_RATES}
    auc = roc_auc(labels, scores) if any(labels) and not all(labels) else None
    total = DetectionScores(
        sum(c.scores.true_positives for c in cases),
        sum(c.scores.false_positives for c in cases),
        sum(c.scores.false_negatives for c in cases),
        0,
    )
    return DetectionReport(
        threshold=threshold,
        cases=cases,
        total=total,
        curve=curve,
        cpm_sensitivities=at,
        cpm=float(np.mean(list(at.values()))),
        auc=auc,
        labels=labels,
        scores=scores,
    )
