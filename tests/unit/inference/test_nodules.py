"""The nodule candidate detector, patches, suppression and size, on phantoms with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.inference.nodules import (
    HU_HIGH,
    HU_LOW,
    blob_diameter_mm,
    detect_candidates,
    extract_patches,
    lung_region,
    nodule_extent,
    score_patches,
    suppress,
)

SPACING = (2.5, 1.0, 1.0)  # slice, row, column (mm)


def chest(
    slices: int = 40, size: int = 128, nodule_mm: float = 12.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A lung of -850 HU with a solid sphere (the nodule) and a vessel running head-feet.

    Returns the HU volume, the lung mask as a segmentation network would give it (the
    dense structures left out) and the nodule's centre in voxels.
    """
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float64)
    zmm, ymm, xmm = z * SPACING[0], y * SPACING[1], x * SPACING[2]
    hu = np.full((slices, size, size), 40.0, np.float32)
    lung = (np.abs(xmm - 64) < 50) & (np.abs(ymm - 64) < 50) & (z > 2) & (z < slices - 3)
    hu[lung] = -850.0
    center = np.array([20.0, 50.0, 40.0])  # voxels
    cz, cy, cx = center * np.asarray(SPACING)
    sphere = (zmm - cz) ** 2 + (ymm - cy) ** 2 + (xmm - cx) ** 2 <= (nodule_mm / 2) ** 2
    hu[sphere] = 30.0
    vessel = ((ymm - 80) ** 2 + (xmm - 90) ** 2 <= 1.5**2) & lung
    hu[vessel] = 20.0
    return hu, lung & ~sphere & ~vessel, center


def test_the_nodule_is_the_strongest_candidate_and_the_vessel_weaker() -> None:
    hu, lung, center = chest()
    found = detect_candidates(hu, lung, SPACING)
    assert len(found) >= 1
    distance = np.linalg.norm((found.centers[0] - center) * np.asarray(SPACING))
    assert distance < 3.0
    # Scale selection: a 12 mm sphere answers best at sigma about 12 / (2 sqrt 3) = 3.5 mm.
    assert found.sigma_mm[0] in (3.0, 4.5)
    assert np.all(np.diff(found.response) <= 0)  # strongest first


def test_candidates_outside_the_lungs_are_not_reported() -> None:
    hu, lung, _ = chest()
    hu[20, 5:12, 5:12] = 300.0  # a dense blob in the chest wall
    found = detect_candidates(hu, lung, SPACING)
    assert not any((c[1] < 14 and c[2] < 14) for c in found.centers)


def test_no_lung_gives_no_candidates() -> None:
    hu, lung, _ = chest()
    found = detect_candidates(hu, np.zeros_like(lung), SPACING)
    assert len(found) == 0
    assert found.centers.shape == (0, 3)


def test_limit_keeps_the_strongest() -> None:
    hu, lung, _ = chest()
    everything = detect_candidates(hu, lung, SPACING, limit=1000)
    two = detect_candidates(hu, lung, SPACING, limit=2)
    assert len(two) == 2
    np.testing.assert_array_equal(two.centers, everything.centers[:2])


def test_lung_region_fills_holes_and_closes_bites() -> None:
    lung = np.zeros((1, 60, 60), dtype=bool)
    lung[0, 10:50, 10:50] = True
    lung[0, 25:30, 25:30] = False  # a nodule inside: a hole
    lung[0, 28:34, 10:14] = False  # a nodule on the pleura: a bite out of the edge
    region = lung_region(lung, (2.5, 1.0, 1.0), closing_mm=6.0)
    assert region[0, 27, 27]  # the hole
    assert region[0, 28:34, 11:14].all()  # the bite, all but its mouth on the edge line
    assert region[lung].all()  # nothing of the lung is lost
    assert not region[0, :10].any() and not region[0, :, :10].any()  # outside stays out


def test_patches_sample_millimetres_around_the_centre() -> None:
    hu = np.full((10, 50, 50), -1000.0, np.float32)
    hu[:, 25, 25] = 400.0  # a bright line through the centre, head to feet
    hu[7] = 0.0  # a slice 5 mm (2 slices) above the centre slice
    patches = extract_patches(hu, (2.5, 1.0, 1.0), np.array([[5.0, 25.0, 25.0]]), 20.0, 21)
    assert patches.shape == (1, 5, 21, 21)
    middle = patches[0, 2]
    assert middle[10, 10] == pytest.approx(1.0)  # 400 HU is the top of the window
    assert middle[0, 0] == pytest.approx(0.0)
    # Offsets of +5 mm take slice 7: uniformly 0 HU.
    assert patches[0, 4] == pytest.approx((0.0 - HU_LOW) / (HU_HIGH - HU_LOW))


def test_patches_at_the_edge_repeat_the_border_and_no_centres_give_none() -> None:
    hu = np.zeros((3, 20, 20), np.float32)
    patches = extract_patches(hu, SPACING, np.array([[0.0, 0.0, 0.0]]))
    assert np.isfinite(patches).all()
    assert extract_patches(hu, SPACING, np.empty((0, 3))).shape == (0, 5, 32, 32)


def test_suppress_keeps_the_best_of_each_cluster() -> None:
    points = np.array([[0, 0, 0], [3, 0, 0], [20, 0, 0], [22, 0, 0]], dtype=float)
    scores = np.array([0.5, 0.9, 0.3, 0.8])
    np.testing.assert_array_equal(suppress(points, scores, 10.0), [1, 3])


@pytest.mark.parametrize("diameter", [6.0, 12.0, 20.0])
def test_nodule_extent_measures_the_diameter(diameter: float) -> None:
    hu, _, center = chest(nodule_mm=diameter)
    extent = nodule_extent(hu, SPACING, center)
    # The longest chord of a digital disc is within a pixel or two of the true one;
    # a sphere's short axis is its long axis.
    assert extent.long_axis_mm == pytest.approx(diameter, abs=2.0)
    assert extent.short_axis_mm == pytest.approx(diameter, abs=2.0)
    assert extent.short_axis_mm <= extent.long_axis_mm
    assert abs(extent.long_axis_slice - center[0]) <= 1  # the widest slice: the middle
    assert extent.volume_mm3(SPACING) == pytest.approx(np.pi / 6 * diameter**3, rel=0.3)


def test_an_elongated_nodule_has_a_short_axis_across_its_long_one() -> None:
    hu = np.full((9, 80, 80), -850.0, np.float32)
    z, y, x = np.mgrid[0:9, 0:80, 0:80]
    # An ellipsoid 24 x 8 x 10 mm whose long axis runs diagonally in the slice.
    u, v = (x - 40 + (y - 40)) / np.sqrt(2), (x - 40 - (y - 40)) / np.sqrt(2)
    hu[(u / 12) ** 2 + (v / 4) ** 2 + ((z - 4) * 2.5 / 5) ** 2 <= 1] = 30.0
    extent = nodule_extent(hu, SPACING, np.array([4.0, 40.0, 40.0]))
    assert extent.long_axis_mm == pytest.approx(24.0, abs=2.0)
    assert extent.short_axis_mm == pytest.approx(8.0, abs=2.0)


def test_a_vessel_leaving_the_nodule_is_cut_at_the_sphere() -> None:
    hu, _, center = chest(nodule_mm=10.0)
    # A thick vessel (4 mm) from the nodule's edge 30 mm across the slice.
    hu[19:22, 48:53, 40:75] = 30.0
    wide = nodule_extent(hu, SPACING, center, max_diameter_mm=50.0)
    tight = nodule_extent(hu, SPACING, center, max_diameter_mm=20.0)
    assert wide.long_axis_mm > 30.0  # the vessel is counted as nodule
    assert tight.long_axis_mm <= 20.0 + 1.0  # the sphere (and one pixel) bounds it
    # Diameter and volume describe one object: the sphere as wide as the object's
    # volume is not much smaller than its long axis.
    equivalent = (6 * tight.volume_mm3(SPACING) / np.pi) ** (1 / 3)
    assert 0.5 * tight.long_axis_mm <= equivalent <= 1.05 * tight.long_axis_mm


def test_the_blob_scale_gives_the_sphere_it_answers_best() -> None:
    assert blob_diameter_mm(3.0) == pytest.approx(10.39, abs=0.01)


def test_nodule_extent_of_air_is_nothing() -> None:
    hu, _, _ = chest()
    extent = nodule_extent(hu, SPACING, np.array([20.0, 100.0, 100.0]))
    assert extent.long_axis_mm == 0.0 and len(extent.voxels) == 0


def test_score_patches_applies_the_sigmoid_and_checks_the_shape() -> None:
    import torch

    patches = np.zeros((5, 5, 8, 8), np.float32)
    probs = score_patches(lambda x: torch.zeros(x.shape[0], 1), patches, torch.device("cpu"), 2)
    np.testing.assert_allclose(probs, 0.5)
    with pytest.raises(ValueError, match=r"one score per patch"):
        score_patches(lambda x: torch.zeros(x.shape[0], 2), patches, torch.device("cpu"))
