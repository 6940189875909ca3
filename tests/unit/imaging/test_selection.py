"""Series selection: required checks, preferences in order, then the tie-breakers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import Route, parse_settings
from dicomnode.imaging.selection import Candidate, choose, refusal
from tests.factories import ct_series

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def route(**select: Any) -> Route:
    settings = parse_settings(
        {"routes": [{"name": "r", "scope": "study", "match": {"Modality": "CT"},
                     "models": ["lung-unet2d"], "select": select}]},
        environ={},
    )  # fmt: skip
    return settings.routes[0]


def candidate(
    number: int,
    slices: int = 5,
    thickness: float | None = 1.0,
    positions: np.ndarray | None = None,
    **attributes: Any,
) -> Candidate:
    orientation = attributes.pop("orientation", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    header: Dataset = ct_series(np.zeros((1, 4, 4), np.float32), orientation=orientation)[0]
    header.SeriesNumber = number
    if thickness is None:
        del header.SliceThickness
    else:
        header.SliceThickness = thickness
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    return Candidate(str(number), header, slices, positions)


def verdicts(choice: dict[str, Any]) -> dict[int, str]:
    return {entry["series_number"]: entry["verdict"] for entry in choice["series"]}


def test_preferences_rank_in_order_before_the_slice_count() -> None:
    r = route(prefer={"ConvolutionKernel": "re:(?i)lung", "ContrastBolusAgent": "re:."})
    series = [
        candidate(1, slices=300, ConvolutionKernel="STANDARD", ContrastBolusAgent="IODINE"),
        candidate(2, slices=100, ConvolutionKernel="LUNG"),
        candidate(3, slices=50, ConvolutionKernel="B70f LUNG", ContrastBolusAgent="IODINE"),
    ]
    choice = choose(r, series)
    assert choice["chosen"] == "3"
    assert verdicts(choice) == {1: "ranked 3", 2: "ranked 2", 3: "chosen"}
    assert "prefers ConvolutionKernel, prefers ContrastBolusAgent, 50 slices" in choice["why"]


def test_ties_go_to_more_slices_then_thinner_then_lower_series_number() -> None:
    r = route()
    assert choose(r, [candidate(1, slices=10), candidate(2, slices=20)])["chosen"] == "2"
    thin_thick = [candidate(1, thickness=2.0), candidate(2, thickness=0.5)]
    assert choose(r, thin_thick)["chosen"] == "2"
    assert choose(r, [candidate(7), candidate(3)])["chosen"] == "3"


@pytest.mark.parametrize(
    ("select", "series", "why"),
    [
        ({"min_slices": 10}, candidate(1, slices=9), "9 slices, fewer than 10"),
        ({"axial": True}, candidate(1, orientation=SAGITTAL),
         "not axial (90 degrees from head-foot)"),
        ({"max_slice_thickness": 3}, candidate(1, thickness=5), "5 mm slices, above 3 mm"),
        ({"max_slice_thickness": 3}, candidate(1, thickness=None), "no slice thickness"),
        ({"distinct_positions": True}, candidate(1), "slice positions unknown"),
    ],
    ids=["slices", "axial", "thick", "no-thickness", "positions-unread"],
)  # fmt: skip
def test_each_required_check_refuses_with_its_reason(
    select: dict[str, Any], series: Candidate, why: str
) -> None:
    r = route(**select)
    assert refusal(r.select, series) == why
    assert verdicts(choose(r, [series])) == {1: f"refused: {why}"}


def test_a_multi_phase_series_that_repeats_positions_is_refused() -> None:
    z = np.arange(5, dtype=float)
    one_phase = np.stack([np.zeros(5), np.zeros(5), z], axis=1)
    two_phases = np.concatenate([one_phase, one_phase])  # arterial + venous, same table
    r = route(distinct_positions=True)
    choice = choose(r, [candidate(1, slices=10, positions=two_phases),
                        candidate(2, slices=5, positions=one_phase)])  # fmt: skip
    assert verdicts(choice) == {1: "refused: 5 slice(s) repeat a position", 2: "chosen"}


def test_without_slice_thickness_the_spacing_of_the_positions_judges() -> None:
    z = np.arange(0, 20, 4.0)
    positions = np.stack([np.zeros(5), np.zeros(5), z], axis=1)
    series = candidate(1, thickness=None, positions=positions)
    assert series.thickness() == 4.0
    assert refusal(route(max_slice_thickness=3).select, series) == "4 mm slices, above 3 mm"


def test_series_that_do_not_match_or_are_not_volumes_are_listed_but_never_chosen() -> None:
    r = route()
    mr = candidate(1, Modality="MR")
    scout = candidate(2, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    choice = choose(r, [mr, scout])
    assert choice["chosen"] is None
    assert verdicts(choice) == {1: "does not match the route", 2: "not a volume (localizer)"}
