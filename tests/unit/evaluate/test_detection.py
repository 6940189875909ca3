"""Detection metrics on hand-made scans, the expected numbers worked out by hand."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from dicomnode.evaluate.detection import (
    CPM_RATES,
    Finding,
    evaluate_detection,
    match_findings,
    match_radius,
    sensitivity_at,
)


@dataclass(frozen=True)
class Nodule:
    center: np.ndarray
    diameter_mm: float


def f(x: float, p: float, y: float = 0.0, d: float = 5.0) -> Finding:
    return Finding(np.array([x, y, 0.0]), d, p)


def n(x: float, d: float, y: float = 0.0) -> Nodule:
    return Nodule(np.array([x, y, 0.0]), d)


# Scan A: N1 at x=0 (10 mm: reach 5 mm), N2 at x=50 (4 mm: reach the 5 mm floor).
# Scan B: no nodule.
REFERENCES = {"A": [n(0, 10), n(50, 4)], "B": []}
PREDICTIONS = {
    "A": [
        f(100, 0.3),  # far from both: FP
        f(1, 0.9),  # 1 mm from N1: TP (N1)
        f(2, 0.8),  # N1 already taken, N2 48 mm away: FP
        f(53, 0.6),  # 3 mm from N2, within the 5 mm floor: TP (N2)
    ],
    "B": [f(0, 0.7)],  # nothing to find: FP
}


def test_match_radius_is_half_the_diameter_with_a_5mm_floor() -> None:
    assert match_radius(n(0, 20)) == 10.0
    assert match_radius(n(0, 4)) == 5.0
    assert match_radius(n(0, 0)) == 5.0
    assert match_findings([f(9.9, 0.5)], [n(0, 20)]) == [0]
    assert match_findings([f(10.1, 0.5)], [n(0, 20)]) == [None]
    assert match_findings([f(4.9, 0.5)], [n(0, 0)]) == [0]  # a point-marked nodule
    assert match_findings([f(5.1, 0.5)], [n(0, 0)]) == [None]


def test_nearest_unmatched_nodule_in_probability_order() -> None:
    nodules = [n(0, 20), n(6, 20)]  # both within reach of anything between them
    # The likelier finding at x=5 takes N2 (1 mm, nearer than N1's 5 mm); the other at
    # x=4 is nearer N2 (2 mm) but N2 is taken, so it gets N1 (4 mm).
    assert match_findings([f(4, 0.2), f(5, 0.9)], nodules) == [0, 1]
    # A third finding on the same pair: both taken, a false positive.
    assert match_findings([f(4, 0.2), f(5, 0.9), f(5, 0.1)], nodules) == [0, 1, None]
    assert match_findings([], nodules) == []
    assert match_findings([f(0, 0.5)], []) == [None]


def test_two_scans_by_hand() -> None:
    report = evaluate_detection(PREDICTIONS, REFERENCES, threshold=0.5)
    # Probabilities in order: 0.9 TP, 0.8 FP, 0.7 FP (B), 0.6 TP, 0.3 FP; 2 nodules, 2 scans.
    curve = [
        (p.threshold, p.true_positives, p.false_positives, p.fp_per_scan) for p in report.curve
    ]
    assert curve == [
        (0.9, 1, 0, 0.0),
        (0.8, 1, 1, 0.5),
        (0.7, 1, 2, 1.0),
        (0.6, 2, 2, 1.0),
        (0.3, 2, 3, 1.5),
    ]
    sens = [p.sensitivity for p in report.curve]
    assert sens == [0.5, 0.5, 0.5, 1.0, 1.0]
    assert [p.precision for p in report.curve] == pytest.approx([1.0, 0.5, 1 / 3, 0.5, 0.4])
    # F1 at 0.8: P = 1/2, R = 1/2 -> 1/2; at 0.3: P = 2/5, R = 1 -> 2*0.4/1.4 = 4/7.
    assert report.curve[1].f1 == pytest.approx(0.5)
    assert report.curve[4].f1 == pytest.approx(4 / 7)
    # Best sensitivity with FP/scan <= rate: 0.5 up to 0.5 FP/scan, 1.0 from 1 FP/scan.
    assert [report.cpm_sensitivities[r] for r in CPM_RATES] == [0.5, 0.5, 0.5, 1, 1, 1, 1]
    assert report.cpm == pytest.approx((3 * 0.5 + 4 * 1.0) / 7)
    # Candidates: positives {0.9, 0.6}, negatives {0.8, 0.7, 0.3}; pairs won: 3 + 1 of 6.
    assert report.auc == pytest.approx(4 / 6)
    # At probability >= 0.5: A keeps 0.9 TP, 0.8 FP, 0.6 TP; B keeps 0.7 FP.
    a, b = report.cases
    assert (a.case, a.nodules, a.findings) == ("A", 2, 4)
    assert (a.scores.true_positives, a.scores.false_positives, a.scores.false_negatives) == (
        2,
        1,
        0,
    )
    assert (b.scores.true_positives, b.scores.false_positives, b.scores.false_negatives) == (
        0,
        1,
        0,
    )
    assert report.total.sensitivity == 1.0
    assert report.total.precision == 0.5
    assert report.total.f1 == pytest.approx(2 / 3)
    assert report.total.accuracy == 0.5  # TP / (TP + FP + FN): a detector has no TN
    fps, sens_curve = report.froc
    assert fps.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0, 1.5]
    assert sens_curve.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0, 1.0]


def test_a_higher_threshold_and_a_missed_nodule() -> None:
    report = evaluate_detection(PREDICTIONS, REFERENCES, threshold=0.85)
    assert report.total.true_positives == 1  # only 0.9
    assert report.total.false_positives == 0
    assert report.total.false_negatives == 1  # N2 is found only at 0.6
    assert report.total.sensitivity == 0.5 and report.total.precision == 1.0
    assert report.total.f1 == pytest.approx(2 / 3)


def test_no_findings_or_one_class_has_no_auc() -> None:
    report = evaluate_detection({}, REFERENCES)
    assert report.curve == [] and report.auc is None and report.cpm == 0.0
    assert report.total.false_negatives == 2
    perfect = evaluate_detection({"A": [f(0, 0.9), f(50, 0.8)]}, REFERENCES)
    assert perfect.auc is None  # no false candidate to rank against
    assert perfect.cpm == 1.0
    assert sensitivity_at(perfect.curve, 0.0) == 1.0


def test_findings_for_an_unknown_case_are_refused() -> None:
    with pytest.raises(ValueError, match="without a reference"):
        evaluate_detection({"C": [f(0, 0.5)]}, REFERENCES)
