"""Rigid registration on the lungs: a known shift and rotation are recovered."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.imaging.registration import register_rigid
from dicomnode.imaging.volume import Volume

SPACING = 2.5  # mm, every axis
SHAPE = (64, 112, 112)  # slices, rows, columns: 160 x 280 x 280 mm
ORIGIN = np.array([-140.0, -140.0, -80.0])  # LPS of voxel (0, 0, 0)
RNG = np.random.default_rng(19)
VESSELS = np.column_stack(  # lung texture: small dense spheres inside the lungs
    [RNG.uniform(-95, 95, 90), RNG.uniform(-60, 60, 90), RNG.uniform(-60, 60, 90)]
)


def chest(points: np.ndarray, nodules: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """HU of a chest phantom at LPS points ``(..., 3)``: body, two lungs, vessels, nodules."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    hu = np.full(points.shape[:-1], -1000.0)
    hu[(x / 130) ** 2 + (y / 90) ** 2 <= 1] = 40.0  # the body, a cylinder
    for side in (-1, 1):
        inside = ((x - side * 55) / 45) ** 2 + (y / 65) ** 2 + (z / 70) ** 2 <= 1
        hu[inside] = -850.0
    lungs = hu == -850.0
    for center in VESSELS:
        near = np.sum((points - center) ** 2, axis=-1) <= 3.0**2
        hu[near & lungs] = 0.0
    for center, radius in nodules:
        hu[np.sum((points - center) ** 2, axis=-1) <= radius**2] = 30.0
    hu[y > 85] = 200.0  # the table: in the field of view, not in the lungs
    return hu


def grid() -> np.ndarray:
    k, r, c = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return ORIGIN + SPACING * np.stack([c, r, k], axis=-1)


def volume(pixels: np.ndarray) -> Volume:
    positions = ORIGIN + np.outer(np.arange(SHAPE[0]), [0.0, 0.0, SPACING])
    return Volume(
        pixels=pixels.astype(np.float32),
        datasets=[],
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        normal=np.array([0.0, 0.0, 1.0]),
        positions=positions,
        pixel_spacing=(SPACING, SPACING),
        slice_spacing=SPACING,
        frames=tuple((i, 1) for i in range(SHAPE[0])),
    )


def rotation_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


@pytest.mark.parametrize(
    ("shift", "degrees"),
    [((12.0, -8.0, 15.0), 0.0), ((-20.0, 6.0, -25.0), 4.0)],
    ids=["shift", "shift-and-rotation"],
)
def test_a_known_shift_and_rotation_are_recovered(
    shift: tuple[float, float, float], degrees: float
) -> None:
    rotation, translation = rotation_z(degrees), np.asarray(shift)
    nodule_today = np.array([40.0, 10.0, 20.0])
    points = grid()
    current = volume(chest(points, [(nodule_today, 5.0)]))
    # The prior scan shows, at its point q, the anatomy at today's R^T (q - t).
    anatomy = (points - translation) @ rotation
    prior = volume(chest(anatomy, [(nodule_today, 4.0)]))

    found = register_rigid(current, prior)

    assert np.allclose(found.rotation, rotation, atol=math.radians(1.0))
    # Measured here: within 0.2 mm and 0.05 degrees.
    assert abs(found.rotation_degrees - degrees) < 0.5
    assert np.linalg.norm(found.translation - translation) < 1.0, found.translation
    # The nodule's centre on the prior, carried back, lands on today's within 1 mm.
    on_prior = rotation @ nodule_today + translation
    assert np.linalg.norm(found.to_current(on_prior)[0] - nodule_today) < 1.0


def test_a_scan_without_lungs_is_refused() -> None:
    solid = volume(np.full(SHAPE, 40.0))
    with pytest.raises(ValueError, match="no air"):
        register_rigid(solid, solid)
