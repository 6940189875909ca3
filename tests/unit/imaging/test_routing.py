from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicomnode.config import Route
from dicomnode.imaging.routing import attribute_text, matching_routes, route_matches


def header(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def route(match: dict, name: str = "r") -> Route:
    return Route(name=name, match=match, models=["m"], send_to=[])


CT = header(
    Modality="CT",
    BodyPartExamined="CHEST",
    ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    SeriesDescription="Thorax 1.25mm",
    SliceThickness=1.25,
)


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({}, True),
        ({"Modality": "CT"}, True),
        ({"Modality": "MR"}, False),
        ({"Modality": "ct"}, False),  # exact means exact
        ({"Modality": ["MR", "CT"]}, True),
        ({"Modality": "CT", "BodyPartExamined": "CHEST"}, True),
        ({"Modality": "CT", "BodyPartExamined": "HEAD"}, False),
        ({"BodyPartExamined": "re:^(CHEST|THORAX)$"}, True),
        ({"SeriesDescription": "re:(?i)thorax"}, True),
        ({"SeriesDescription": "re:^thorax"}, False),
        ({"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}, True),
        ({"ImageType": "re:\\\\AXIAL$"}, True),
        ({"ImageType": "re:LOCALIZER"}, False),
        ({"SliceThickness": "1.25"}, True),
        ({"Manufacturer": "re:.*"}, False),  # absent attributes never match
        ({"Modality": ["MR", "re:^C"]}, True),
    ],
)
def test_route_matching(match: dict, expected: bool) -> None:
    assert route_matches(route(match), CT) is expected


def test_matching_routes_keeps_configuration_order() -> None:
    routes = [route({"Modality": "CT"}, "a"), route({"Modality": "MR"}, "b"), route({}, "c")]
    assert [r.name for r in matching_routes(routes, CT)] == ["a", "c"]


def test_attribute_text() -> None:
    assert attribute_text(CT, "ImageType") == "ORIGINAL\\PRIMARY\\AXIAL"
    assert attribute_text(header(Modality=""), "Modality") is None
    assert attribute_text(CT, "PatientName") is None
