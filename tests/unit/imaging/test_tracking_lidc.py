"""LIDC-IDRI-0132: two real chest CTs of one patient, the readers' nodules matched across them.

The two studies differ by about 490 mm along the table (each scanner's own origin) and
by the breath held. Registered rigidly on the lungs, the readers' nodule centres of
one scan are carried into the other and matched one to one. Three nodules are marked
in both scans: the 26 mm mass and two nodules of 6-7 mm. They are matched, within
6-11 mm (a rigid transform leaves the lungs' different inflation), while every other
pair stays more than 25 mm apart; the mismatched marks are nodules that only one
scan's readers marked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicomnode.imaging import load_series
from dicomnode.imaging.registration import register_rigid
from dicomnode.imaging.tracking import Nodule, compare, match

pytestmark = pytest.mark.slow

CASE = "LIDC-IDRI-0132"
FIRST, SECOND = "151647338241909635299641922057", "254176853278710432756285662989"


def readers(data_dir: Path, folder: str) -> list[Nodule]:
    """Each nodule the readers marked: the mean of their centres, the median extent."""
    marks = json.loads((data_dir / "ct" / CASE / "readers.json").read_text())[folder]["marks"]
    by_nodule: dict[int, list[dict]] = {}
    for mark in marks:
        by_nodule.setdefault(mark["nodule"], []).append(mark)
    return [
        Nodule(
            tuple(np.mean([m["center_mm"] for m in group], axis=0)),
            float(np.median([m["extent_mm"] for m in group])),
            0.0,
        )
        for _, group in sorted(by_nodule.items())
    ]


@pytest.mark.parametrize(("current", "prior"), [(SECOND, FIRST), (FIRST, SECOND)])
def test_the_readers_nodules_in_both_scans_are_matched(
    data_dir: Path, current: str, prior: str
) -> None:
    case = data_dir / "ct" / CASE
    today = load_series(sorted((case / current).glob("*.dcm")))
    before = load_series(sorted((case / prior).glob("*.dcm")))
    transform = register_rigid(today, before)
    # The two scanners' table origins differ by about 490 mm.
    assert 480 < np.linalg.norm(transform.translation) < 505
    assert transform.rotation_degrees < 5

    now, then = readers(data_dir, current), readers(data_dir, prior)
    carried = [
        Nodule(tuple(transform.to_current(np.array(n.center))[0]), n.diameter_mm, n.volume_ml)
        for n in then
    ]
    pairs = match(now, carried)
    # Readers' nodule numbers (readers.json): the mass is 1 in both scans; the first
    # scan's 2 and 3 are the second scan's 4 and 6.
    expected = {(1, 1), (4, 2), (6, 3)}
    if current == FIRST:
        expected = {(j, i) for i, j in expected}
    assert {(i + 1, j + 1) for i, j, _ in pairs} == expected
    assert max(d for _, _, d in pairs) < 11.0
    distances = np.linalg.norm(
        np.array([n.center for n in now])[:, None] - np.array([n.center for n in carried])[None],
        axis=2,
    )
    for i, j, _ in pairs:
        distances[i, :] = distances[:, j] = np.inf
    assert distances.min() > 25.0  # the unmatched marks are far from any other
    # TCIA set both study dates to 2000-01-01: no doubling time, and the record says why.
    changes = compare(now, carried, None, None)
    assert {c.note for c in changes if c.status == "matched"} == {"a study date is unknown"}
    assert sum(c.status == "new" for c in changes) == len(now) - 3
    assert sum(c.status == "no longer seen" for c in changes) == len(then) - 3
