"""Nodules over time: matching after registration, growth and doubling time."""

from __future__ import annotations

import math
from datetime import date

import pytest

from dicomnode.imaging.tracking import Nodule, compare, doubling_days, match


def sphere_ml(diameter_mm: float) -> float:
    return math.pi / 6 * diameter_mm**3 / 1000


def nodule(x: float, y: float, z: float, diameter: float) -> Nodule:
    return Nodule((x, y, z), diameter, sphere_ml(diameter))


def test_matched_new_and_no_longer_seen() -> None:
    today = [nodule(40, 10, 20, 8.0), nodule(-50, 0, -30, 5.0), nodule(0, 30, 60, 4.0)]
    # The prior's centres as registration carried them over: within a few mm.
    prior = [nodule(-47, 2, -28, 5.0), nodule(38, 12, 21, 6.0), nodule(-20, -40, 0, 6.0)]
    changes = compare(today, prior, date(2024, 1, 1), date(2023, 1, 1))
    assert [(c.current, c.prior, c.status) for c in changes] == [
        (0, 1, "matched"),
        (1, 0, "matched"),
        (2, None, "new"),
        (None, 2, "no longer seen"),
    ]


def test_known_growth_gives_the_doubling_time() -> None:
    # 6 mm to 8 mm in 365 days: volume x (8/6)^3 = 2.37, doubling time 293 days.
    changes = compare([nodule(0, 0, 0, 8.0)], [nodule(1, 1, 1, 6.0)], date(2024, 1, 1),
                      date(2023, 1, 1))  # fmt: skip
    (change,) = changes
    assert change.trend == "growing"
    assert change.volume_change_percent == pytest.approx(100 * ((8 / 6) ** 3 - 1))
    assert change.diameter_change_mm == pytest.approx(2.0)
    assert change.doubling_days == pytest.approx(365 * math.log(2) / (3 * math.log(8 / 6)))
    assert round(change.doubling_days) == 293
    assert change.note is None


@pytest.mark.parametrize(
    ("prior_ml", "current_ml", "days", "note"),
    [
        (0.2, 0.2, 365, "the volume did not grow"),
        (0.3, 0.2, 365, "the volume did not grow"),
        (0.1, 0.2, None, "a study date is unknown"),
        (0.1, 0.2, 0, "the interval is not positive"),
    ],
)
def test_no_doubling_time_says_why(
    prior_ml: float, current_ml: float, days: int | None, note: str
) -> None:
    assert doubling_days(prior_ml, current_ml, days) is None
    current_date = None if days is None else date(2024, 1, 1)
    prior_date = (
        date(2024, 1, 1) if days is None else date.fromordinal(date(2024, 1, 1).toordinal() - days)
    )
    (change,) = compare([Nodule((0, 0, 0), 6, current_ml)], [Nodule((0, 0, 0), 6, prior_ml)],
                        current_date, prior_date)  # fmt: skip
    assert change.doubling_days is None and change.note == note


def test_the_tolerance_grows_with_the_nodule() -> None:
    # 15 mm apart: too far for two 6 mm nodules, close enough for a 20 mm mass.
    assert match([nodule(0, 0, 15, 6.0)], [nodule(0, 0, 0, 6.0)]) == []
    assert match([nodule(0, 0, 15, 20.0)], [nodule(0, 0, 0, 18.0)]) == [(0, 0, 15.0)]


def test_one_to_one_by_least_total_distance() -> None:
    # Greedy would give today's 0 the prior's 0 (4 mm) and leave today's 1 unmatched.
    today = [nodule(0, 0, 0, 6.0), nodule(0, 0, 9, 6.0)]
    prior = [nodule(0, 0, 4, 6.0), nodule(0, 0, -5, 6.0)]
    assert sorted((i, j) for i, j, _ in match(today, prior)) == [(0, 1), (1, 0)]
