"""Outlines of masks, as closed polylines a report can draw on an image."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from dicomnode.imaging import Volume
from dicomnode.outputs.sr import SegmentOutline

# Moore neighbourhood, clockwise from west, as (row, column) steps.
_STEPS = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))


def largest_slice(mask: np.ndarray) -> int:
    """Return the slice of a ``(slices, rows, columns)`` mask with the most voxels.

    Returns -1 for an empty mask.
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    return int(np.argmax(areas)) if areas.any() else -1


def outline(mask: np.ndarray, max_points: int = 256) -> np.ndarray:
    """Trace the outer boundary of the largest region of a 2-D mask.

    Moore-neighbour tracing with Jacob's stopping rule walks the boundary pixels
    clockwise (as the image is shown, rows going down); holes are ignored.

    Parameters
    ----------
    mask : np.ndarray
        ``(rows, columns)`` bool.
    max_points : int
        At most this many points (every n-th boundary pixel is kept); a report's
        outline needs its shape, not every pixel.

    Returns
    -------
    np.ndarray
        ``(n, 2)`` float ``(column, row)`` pixel centres in SCOORD's convention (the
        image's top-left corner is 0, 0, so a pixel's centre is its index + 0.5),
        closed: the last point is the first. Empty ``(0, 2)`` for an empty mask.
    """
    labels, count = ndi.label(mask)
    if count == 0:
        return np.empty((0, 2), dtype=np.float64)
    sizes = np.bincount(labels.ravel())[1:]
    region = np.pad(labels == int(np.argmax(sizes)) + 1, 1)
    start = tuple(int(v) for v in np.argwhere(region)[0])  # top row, leftmost pixel
    points = [start]
    current, back = start, 0  # its west neighbour is outside: the search starts there
    first_step = -1
    for _ in range(4 * region.size):  # a bound, never reached by a closed boundary
        for turn in range(1, 9):
            step = (back + turn) % 8
            row, col = current[0] + _STEPS[step][0], current[1] + _STEPS[step][1]
            if region[row, col]:
                break
        else:
            break  # a single pixel
        if current == start and step == first_step:
            break  # back at the start, leaving it the same way: the loop is closed
        if first_step < 0:
            first_step = step
        # The last neighbour found outside, seen from the new pixel, is where the next
        # clockwise search starts.
        outside = _STEPS[(step - 1) % 8]
        offset = (current[0] + outside[0] - row, current[1] + outside[1] - col)
        back = _STEPS.index(offset)
        current = (row, col)
        points.append(current)
    traced = np.asarray(points, dtype=np.float64)
    if len(traced) > max_points:
        keep = np.linspace(0, len(traced) - 1, max_points).round().astype(int)
        traced = traced[keep]
    if len(traced) == 1 or (traced[0] != traced[-1]).any():
        traced = np.vstack([traced, traced[:1]])
    # Undo the padding, then pixel index -> SCOORD pixel centre; (row, col) -> (col, row).
    return (traced - 1.0 + 0.5)[:, ::-1].copy()


def segment_outlines(
    labels: np.ndarray, count: int, volume: Volume, max_points: int = 256
) -> list[SegmentOutline]:
    """Return each segment's outline on the slice where the segments are largest.

    Parameters
    ----------
    labels : np.ndarray
        ``(slices, rows, columns)`` segment numbers (0 is background).
    count : int
        Segments 1..count are outlined; an empty one is left out, and one absent from
        the common slice is outlined where it is largest itself.
    volume : Volume
        The source series the labels lie on.
    max_points : int
        Most points per outline.

    Returns
    -------
    list[SegmentOutline]
        In segment order.
    """
    out: list[SegmentOutline] = []
    if count == 0:
        return out  # a classification: no labels at all
    # One slice for all where they share one (the slice with most of them): a viewer
    # then shows both lungs' outlines and volumes together.
    common = largest_slice(labels > 0)
    for number in range(1, count + 1):
        mask = labels == number
        k = common if common >= 0 and mask[common].any() else largest_slice(mask)
        if k < 0:
            continue
        source, frame = volume.source_of(k)
        out.append(
            SegmentOutline(
                segment_number=number,
                source=source,
                frame_number=frame if volume.is_multiframe else None,
                points=outline(mask[k], max_points),
            )
        )
    return out
