"""Metrics against values worked out by hand, and their properties (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dicomnode.evaluate import scores as metrics


def test_overlap_by_hand() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 voxels
    b[0, 2:4] = True  # 2, both inside a
    b[1, 0] = True  # 1 outside
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / 7)
    assert metrics.iou(a, b) == pytest.approx(2 / 5)
    empty = np.zeros((4, 4), bool)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.dice(a, empty) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice(a, a[:2])


def test_hausdorff95_of_a_shifted_block_is_the_shift_in_mm() -> None:
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=0)  # shifted 2 slices; slices 2.5 mm apart
    hd = metrics.hausdorff95(a, b, spacing=(2.5, 0.7, 0.7))
    assert hd == pytest.approx(5.0)
    assert metrics.hausdorff95(a, a, (1, 1, 1)) == 0.0
    assert math.isinf(metrics.hausdorff95(a, np.zeros_like(a), (1, 1, 1)))


def test_scores_and_volumes() -> None:
    a = np.zeros((10, 10, 10), bool)
    a[:5] = True  # 500 voxels
    b = np.zeros_like(a)
    b[:4] = True  # 400
    s = metrics.score_segmentation(b, a, spacing=(2.0, 1.0, 1.0))  # 2 uL voxels
    assert s.volume_ml == pytest.approx(0.8) and s.reference_volume_ml == pytest.approx(1.0)
    assert s.volume_difference_ml == pytest.approx(-0.2)
    assert s.volume_difference_percent == pytest.approx(-20.0)
    assert s.dice == pytest.approx(800 / 900) and s.hausdorff95_mm > 0


def test_detection_rates_by_hand() -> None:
    c = metrics.confusion(
        [True, True, True, False, False, False, False],
        [True, True, False, True, False, False, False],
    )
    assert (c.true_positives, c.false_positives, c.false_negatives, c.true_negatives) == (
        2, 1, 1, 3,
    )  # fmt: skip
    assert c.sensitivity == pytest.approx(2 / 3)
    assert c.precision == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(2 / 3)
    assert c.accuracy == pytest.approx(5 / 7)
    none = metrics.DetectionScores(0, 0, 0, 0)
    assert none.sensitivity == none.precision == none.f1 == none.accuracy == 0.0
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        metrics.confusion([True, False, True], [True, False])


def test_auc_by_hand_and_with_ties() -> None:
    assert metrics.roc_auc([True, True, False, False], [0.9, 0.8, 0.3, 0.1]) == 1.0
    assert metrics.roc_auc([True, True, False, False], [0.1, 0.2, 0.8, 0.9]) == 0.0
    # 3 positives x 2 negatives: 0.9 wins twice, 0.5 ties once (half) and wins once,
    # 0.3 loses twice -> 3.5 of 6 pairs
    assert metrics.roc_auc([1, 1, 1, 0, 0], [0.9, 0.5, 0.3, 0.5, 0.4]) == pytest.approx(3.5 / 6)
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_auc([True, True], [0.2, 0.3])
    fpr, tpr = metrics.roc_curve([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


masks = arrays(bool, (6, 7, 5))


@settings(max_examples=60, deadline=None)
@given(masks, masks)
def test_overlap_properties(a: np.ndarray, b: np.ndarray) -> None:
    d, j = metrics.dice(a, b), metrics.iou(a, b)
    assert 0.0 <= j <= d <= 1.0
    assert d == pytest.approx(metrics.dice(b, a))
    assert d == pytest.approx(2 * j / (1 + j))
    if a.any():
        assert metrics.dice(a, a) == 1.0 and metrics.hausdorff95(a, a, (1, 1, 1)) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=2, max_size=40).filter(
        lambda cases: len({y for y, _ in cases}) == 2
    )
)
def test_auc_matches_the_area_under_the_curve(cases: list[tuple[bool, float]]) -> None:
    labels = [y for y, _ in cases]
    scores = [s for _, s in cases]
    fpr, tpr = metrics.roc_curve(labels, scores)
    assert metrics.roc_auc(labels, scores) == pytest.approx(np.trapezoid(tpr, fpr))
    flipped = metrics.roc_auc(labels, [-s for s in scores])
    assert metrics.roc_auc(labels, scores) + flipped == pytest.approx(1.0)
