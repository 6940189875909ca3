"""Outlines traced from masks: closed, on the boundary, in SCOORD's pixel convention."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.outputs.contours import largest_slice, outline


def test_a_rectangle_is_traced_through_its_boundary_pixel_centres() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    points = outline(mask)
    assert (points[0] == points[-1]).all()  # closed
    # (column, row) with the pixel centre at index + 0.5
    assert points[:, 0].min() == 3.5 and points[:, 0].max() == 8.5
    assert points[:, 1].min() == 2.5 and points[:, 1].max() == 5.5
    # every boundary pixel once: 2 * (6 + 4) - 4, and the start again
    assert len(points) == 17


def test_a_disc_outline_lies_on_its_edge_and_is_thinned_to_the_limit() -> None:
    yy, xx = np.mgrid[:100, :100]
    mask = (yy - 50) ** 2 + (xx - 40) ** 2 < 30**2
    points = outline(mask, max_points=64)
    assert len(points) <= 65 and (points[0] == points[-1]).all()
    radius = np.hypot(points[:, 0] - 40.5, points[:, 1] - 50.5)
    assert radius == pytest.approx(np.full(len(points), 29.5), abs=1.0)


def test_the_largest_region_is_outlined_and_holes_are_ignored() -> None:
    mask = np.zeros((40, 40), bool)
    mask[2:5, 2:5] = True  # small
    mask[10:30, 10:30] = True
    mask[15:20, 15:20] = False  # a hole
    points = outline(mask)
    assert points[:, 0].min() == 10.5 and points[:, 0].max() == 29.5


def test_empty_and_single_pixel_masks() -> None:
    assert outline(np.zeros((5, 5), bool)).shape == (0, 2)
    single = np.zeros((5, 5), bool)
    single[2, 3] = True
    assert outline(single).tolist() == [[3.5, 2.5], [3.5, 2.5]]
    volume = np.zeros((3, 4, 4), bool)
    assert largest_slice(volume) == -1
    volume[1, :2] = volume[2, 0] = True
    assert largest_slice(volume) == 1
