from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)

from dicomnode.imaging.volumetric import why_not_volumetric
from tests.factories import ct_series


def header(**changes: object) -> Dataset:
    ds = ct_series(np.zeros((1, 8, 8), np.float32))[0]
    del ds.PixelData  # the sweep reads headers without pixel data
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("changes", "count", "reason"),
    [
        ({}, 120, None),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 3, "localizer"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "TOPOGRAM"]}, 1, "localizer"),
        ({}, 1, "1 slice(s)"),
        ({"SOPClassUID": EnhancedCTImageStorage, "NumberOfFrames": 200}, 1, None),
        (
            {"SOPClassUID": XRayRadiationDoseSRStorage, "Modality": "SR", "Rows": None,
             "Columns": None},
            1,
            "dose report",
        ),
        ({"Modality": "KO", "Rows": None, "Columns": None}, 1, "no images (KO)"),
        ({"SOPClassUID": SecondaryCaptureImageStorage, "Modality": "OT"}, 40, "secondary capture"),
        ({"SOPClassUID": CTImageStorage, "Modality": "CT"}, 2, None),
    ],
)  # fmt: skip
def test_why_not_volumetric(changes: dict, count: int, reason: str | None) -> None:
    assert why_not_volumetric(header(**changes), count) == reason
