from __future__ import annotations

import numpy as np
import pytest

from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.inference.lungs import largest_components, split_left_right
from tests.factories import AXIAL, ct_series


def geometry(orientation=AXIAL, shape=(6, 40, 40)):
    return volume_from_datasets(
        ct_series(np.zeros(shape, np.float32), orientation=orientation, origin=(-16, -16, 0))
    )


def blobs(shape=(6, 40, 40), bridge: bool = False) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[1:5, 10:30, 4:16] = True  # low column index
    mask[1:5, 10:30, 22:38] = True  # high column index, bigger
    if bridge:
        mask[2:3, 18:20, 16:22] = True
    mask[0, 0, 0] = True  # a speck of noise
    return mask


def test_two_lungs_by_patient_x_axial() -> None:
    vol = geometry()
    left, right = split_left_right(blobs(), vol)
    # Axial, row direction +x: higher column = larger x = patient's left.
    assert left[1:5, 10:30, 22:38].all()
    assert right[1:5, 10:30, 4:16].all()
    assert not (left & right).any()
    assert not left[0, 0, 0] and not right[0, 0, 0]  # noise dropped


def test_flipped_rows_swap_sides() -> None:
    # Row direction -x (image mirrored): now low columns are the patient's left.
    vol = geometry(orientation=(-1, 0, 0, 0, 1, 0))
    left, right = split_left_right(blobs(), vol)
    assert left[1:5, 10:30, 4:16].all()
    assert right[1:5, 10:30, 22:38].all()


def test_fused_lungs_are_cut_at_the_gap() -> None:
    vol = geometry()
    mask = blobs(bridge=True)
    _, kept = largest_components(mask, 0.1)
    assert len(kept) == 1  # the bridge makes one component
    left, right = split_left_right(mask, vol)
    assert left[1:5, 10:30, 23:38].all()
    assert right[1:5, 10:30, 4:16].all()
    assert (left | right).sum() == mask.sum() - 1  # everything but the noise speck


def test_empty_mask() -> None:
    left, right = split_left_right(np.zeros((6, 40, 40), bool), geometry())
    assert not left.any() and not right.any()


@pytest.mark.parametrize("fraction", [0.05, 0.5])
def test_component_threshold(fraction: float) -> None:
    mask = np.zeros((1, 20, 20), bool)
    mask[0, :10, :10] = True  # 100
    mask[0, 15:, 15:] = True  # 25
    _, kept = largest_components(mask, fraction)
    assert len(kept) == (2 if fraction < 0.25 else 1)


def test_large_gas_pocket_beside_fused_lungs_is_not_a_lung() -> None:
    # Fused lungs (one component) plus a separate air pocket under the left lung that
    # is more than 10% of the lungs: the lungs still come out left and right, and the
    # pocket is dropped instead of becoming the "left lung".
    shape = (10, 40, 40)
    vol = geometry(shape=shape)
    mask = np.zeros(shape, bool)
    mask[1:7, 10:30, 4:16] = True
    mask[1:7, 10:30, 22:36] = True
    mask[2:4, 18:20, 16:22] = True  # the junction line fuses them
    mask[8:10, 12:30, 24:36] = True  # gas pocket below the left lung, not touching it
    _, kept = largest_components(mask, 0.1)
    assert len(kept) == 2  # fused lungs + a pocket big enough to survive the noise filter
    left, right = split_left_right(mask, vol)
    assert left[1:7, 10:30, 23:36].all() and right[1:7, 10:30, 4:16].all()
    assert not left[8:10].any() and not right[8:10].any()
