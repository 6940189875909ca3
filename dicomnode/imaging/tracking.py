"""Nodules over time: today's findings matched to the prior's, and how each changed.

The prior's nodule centres are carried into today's coordinates by the registration
(:mod:`dicomnode.imaging.registration`); each pair is then matched one to one by
least total distance (the Hungarian method), within a tolerance that grows with the
nodule's size, since a large nodule's centre moves more as it grows and as the lungs
fill differently. A matched nodule keeps the prior's identity; one without a partner
is "new" today or "no longer seen".

Growth is reported as the change in volume and in diameter, and as the volume
doubling time, ``interval x ln 2 / ln(V_today / V_prior)``, when both study dates
are known and the volume grew (for a shrinking or stable nodule it is not defined,
and the record says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

import numpy as np
from scipy.optimize import linear_sum_assignment

MATCH_MM = 10.0  # the least distance allowed between matched centres (registration error)
MATCH_DIAMETERS = 1.0  # ... or this many of the larger nodule's diameters, when more
STABLE_PERCENT = 25.0  # a smaller volume change is within measurement error: "stable"


@dataclass(frozen=True)
class Nodule:
    """One nodule at one time point: where (LPS mm) and how large."""

    center: tuple[float, float, float]
    diameter_mm: float
    volume_ml: float


@dataclass(frozen=True)
class Change:
    """One nodule across the two time points.

    ``current`` and ``prior`` are indices into the two lists (None when absent).
    """

    current: int | None
    prior: int | None
    distance_mm: float | None  # between the centres, after registration
    status: str  # "matched", "new" or "no longer seen"
    volume_change_percent: float | None
    diameter_change_mm: float | None
    doubling_days: float | None
    trend: str | None  # "growing", "stable" or "shrinking"; None unless matched
    note: str | None  # why the doubling time is not given


def match(current: list[Nodule], prior_in_current: list[Nodule]) -> list[tuple[int, int, float]]:
    """Pair today's nodules with the prior's (centres already in today's coordinates).

    Parameters
    ----------
    current : list[Nodule]
        Today's nodules.
    prior_in_current : list[Nodule]
        The prior's nodules, their centres carried into today's coordinates.

    Returns
    -------
    list[tuple[int, int, float]]
        ``(current index, prior index, distance in mm)`` for each match.
    """
    if not current or not prior_in_current:
        return []
    a = np.asarray([n.center for n in current], dtype=float)
    b = np.asarray([n.center for n in prior_in_current], dtype=float)
    distance = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    largest = np.maximum.outer(
        [n.diameter_mm for n in current], [n.diameter_mm for n in prior_in_current]
    )
    allowed = np.maximum(MATCH_MM, MATCH_DIAMETERS * largest)
    # Pairs beyond the tolerance cost more than any allowed one, so they are chosen only
    # when nothing else is possible, and then dropped below.
    cost = np.where(distance <= allowed, distance, distance + 1e6)
    rows, cols = linear_sum_assignment(cost)
    return [
        (int(i), int(j), float(distance[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if distance[i, j] <= allowed[i, j]
    ]


def doubling_days(prior_ml: float, current_ml: float, interval_days: float | None) -> float | None:
    """Return the volume doubling time in days, or None when it is not defined.

    Parameters
    ----------
    prior_ml, current_ml : float
        The volumes then and now.
    interval_days : float or None
        Days between the two studies (None when a date is unknown).

    Returns
    -------
    float or None
        ``interval x ln 2 / ln(current / prior)`` for a nodule that grew; None when the
        interval is unknown or not positive, or the volume did not grow.
    """
    if interval_days is None or interval_days <= 0 or prior_ml <= 0 or current_ml <= prior_ml:
        return None
    return interval_days * math.log(2.0) / math.log(current_ml / prior_ml)


def compare(
    current: list[Nodule],
    prior_in_current: list[Nodule],
    current_date: date | None,
    prior_date: date | None,
) -> list[Change]:
    """Match the nodules and say how each changed, today's first, then the vanished ones.

    Parameters
    ----------
    current, prior_in_current : list[Nodule]
        Today's and the prior's nodules (the prior's centres in today's coordinates).
    current_date, prior_date : date or None
        The two studies' dates.

    Returns
    -------
    list[Change]
        One per nodule of either time point.
    """
    interval = (
        (current_date - prior_date).days
        if current_date is not None and prior_date is not None
        else None
    )
    pairs = {i: (j, d) for i, j, d in match(current, prior_in_current)}
    changes: list[Change] = []
    for i, nodule in enumerate(current):
        if i not in pairs:
            changes.append(Change(i, None, None, "new", None, None, None, None, None))
            continue
        j, distance = pairs[i]
        before = prior_in_current[j]
        percent = (
            100.0 * (nodule.volume_ml - before.volume_ml) / before.volume_ml
            if before.volume_ml > 0
            else None
        )
        trend = (
            None
            if percent is None
            else "stable"
            if abs(percent) < STABLE_PERCENT
            else "growing"
            if percent > 0
            else "shrinking"
        )
        days = doubling_days(before.volume_ml, nodule.volume_ml, interval)
        note = None
        if days is None:
            note = (
                "a study date is unknown"
                if interval is None
                else "the interval is not positive"
                if interval <= 0
                else "the volume did not grow"
            )
        changes.append(
            Change(
                current=i,
                prior=j,
                distance_mm=distance,
                status="matched",
                volume_change_percent=percent,
                diameter_change_mm=nodule.diameter_mm - before.diameter_mm,
                doubling_days=days,
                trend=trend,
                note=note,
            )
        )
    matched = {j for j, _ in pairs.values()}
    for j in range(len(prior_in_current)):
        if j not in matched:
            changes.append(Change(None, j, None, "no longer seen", None, None, None, None, None))
    return changes
