"""LIDC-IDRI reader annotations (``LidcReadMessage`` XML) as reference nodules and masks.

Each of up to four radiologists marked every nodule of 3 mm or more with a contour per
slice, smaller nodules with a single point, and non-nodules with a point. Readers
numbered their nodules independently, so the same nodule appears up to four times:
:func:`consensus_nodules` groups the marks that lie together into one reference nodule
that records how many readers agreed.

Coordinates in the XML are pixel indices (x = column, y = row) on the image named by
its SOP Instance UID; geometry comes from the series itself, so nothing here guesses a
slice from a z value.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dicomnode.errors import LidcError

_NS = "{http://www.nih.gov}"


@dataclass(frozen=True)
class Roi:
    """One reader's outline of a nodule on one image."""

    sop_uid: str
    z: float
    inclusion: bool
    points: np.ndarray  # (n, 2) pixel indices as (column, row)


@dataclass(frozen=True)
class ReaderMark:
    """One reader's mark: a contoured nodule (>= 3 mm), a small nodule or a non-nodule."""

    reader: int  # index of the reading session in the file
    kind: str  # "nodule", "small-nodule" or "non-nodule"
    rois: tuple[Roi, ...]
    malignancy: int | None = None


@dataclass(frozen=True)
class Geometry:
    """What maps a pixel of one image to patient coordinates (LPS, mm)."""

    position: np.ndarray  # ImagePositionPatient
    row_direction: np.ndarray
    column_direction: np.ndarray
    spacing: tuple[float, float]  # (row spacing, column spacing)

    def to_patient(self, column: float, row: float) -> np.ndarray:
        """Return the patient coordinates of a (column, row) pixel index."""
        return (
            self.position
            + column * self.spacing[1] * self.row_direction
            + row * self.spacing[0] * self.column_direction
        )


@dataclass(frozen=True)
class ReferenceNodule:
    """A nodule as the readers agree on it."""

    center: np.ndarray  # patient coordinates (LPS, mm)
    diameter_mm: float  # mean over contouring readers; 0 for point-only marks
    readers: int  # how many readers marked it
    contoured: bool  # at least one reader outlined it (>= 3 mm)
    marks: tuple[ReaderMark, ...]


def _text(element: ET.Element, tag: str) -> str | None:
    found = element.find(_NS + tag)
    return None if found is None or found.text is None else found.text.strip()


def _rois(element: ET.Element) -> tuple[Roi, ...]:
    rois = []
    for roi in element.findall(_NS + "roi"):
        points = [
            (int(p.findtext(_NS + "xCoord", "0")), int(p.findtext(_NS + "yCoord", "0")))
            for p in roi.findall(_NS + "edgeMap")
        ]
        rois.append(
            Roi(
                sop_uid=_text(roi, "imageSOP_UID") or "",
                z=float(_text(roi, "imageZposition") or "nan"),
                inclusion=(_text(roi, "inclusion") or "TRUE").upper() == "TRUE",
                points=np.asarray(points, dtype=np.float64).reshape(-1, 2),
            )
        )
    return tuple(rois)


def _locus(element: ET.Element) -> tuple[Roi, ...]:
    """Read a non-nodule: one point, its image named beside it rather than in a roi."""
    locus = element.find(_NS + "locus")
    if locus is None:
        return ()
    point = (float(_text(locus, "xCoord") or 0), float(_text(locus, "yCoord") or 0))
    return (
        Roi(
            sop_uid=_text(element, "imageSOP_UID") or "",
            z=float(_text(element, "imageZposition") or "nan"),
            inclusion=True,
            points=np.asarray([point], dtype=np.float64),
        ),
    )


def read_marks(path: Path) -> tuple[str, list[ReaderMark]]:
    """Read every reader's marks from an LIDC XML file.

    Parameters
    ----------
    path : Path
        A ``LidcReadMessage`` file.

    Returns
    -------
    tuple[str, list[ReaderMark]]
        The Series Instance UID it annotates, and the marks.

    Raises
    ------
    LidcError
        If the file is not an LIDC read message.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise LidcError(f"{path}: not readable as LIDC XML: {exc}") from None
    if root.tag != _NS + "LidcReadMessage":
        raise LidcError(f"{path}: not an LIDC read message (root is {root.tag})")
    header = root.find(_NS + "ResponseHeader")
    series_uid = "" if header is None else _text(header, "SeriesInstanceUid") or ""
    marks: list[ReaderMark] = []
    for reader, session in enumerate(root.findall(_NS + "readingSession")):
        for nodule in session.findall(_NS + "unblindedReadNodule"):
            rois = _rois(nodule)
            outlined = any(len(r.points) > 1 for r in rois)
            malignancy = nodule.findtext(f"{_NS}characteristics/{_NS}malignancy")
            marks.append(
                ReaderMark(
                    reader=reader,
                    kind="nodule" if outlined else "small-nodule",
                    rois=rois,
                    malignancy=int(malignancy) if malignancy else None,
                )
            )
        for non in session.findall(_NS + "nonNodule"):
            marks.append(ReaderMark(reader=reader, kind="non-nodule", rois=_locus(non)))
    return series_uid, marks


def _geometry(geometries: Mapping[str, Geometry], roi: Roi) -> Geometry:
    try:
        return geometries[roi.sop_uid]
    except KeyError:
        raise LidcError(f"annotation refers to image {roi.sop_uid}, not in the series") from None


def mark_center(mark: ReaderMark, geometries: Mapping[str, Geometry]) -> np.ndarray:
    """Return the centre of a mark in patient coordinates (mean of its included points)."""
    points = [
        _geometry(geometries, roi).to_patient(*p)
        for roi in mark.rois
        if roi.inclusion
        for p in roi.points
    ]
    if not points:
        raise LidcError("a mark without included points")
    return np.mean(points, axis=0)


def mark_diameter(mark: ReaderMark, geometries: Mapping[str, Geometry]) -> float:
    """Return the longest in-plane distance across the mark's outlines, in mm (0 for points)."""
    longest = 0.0
    for roi in mark.rois:
        if not roi.inclusion or len(roi.points) < 2:
            continue
        geometry = _geometry(geometries, roi)
        scaled = roi.points * np.array([geometry.spacing[1], geometry.spacing[0]])
        gaps = scaled[:, None, :] - scaled[None, :, :]
        longest = max(longest, float(np.sqrt((gaps**2).sum(-1)).max()))
    return longest


def consensus_nodules(
    marks: Sequence[ReaderMark], geometries: Mapping[str, Geometry], tolerance_mm: float = 5.0
) -> list[ReferenceNodule]:
    """Group the readers' nodule marks that describe the same nodule.

    Two marks are the same nodule when their centres lie closer than half the larger
    diameter plus ``tolerance_mm``; groups are joined transitively (single link), and a
    group never holds two marks of one reader, so two nearby nodules marked by the
    same reader stay apart. Non-nodule marks are left out.

    Parameters
    ----------
    marks : sequence of ReaderMark
        From :func:`read_marks`.
    geometries : mapping
        Image geometry by SOP Instance UID.
    tolerance_mm : float
        Extra distance allowed between the centres of one nodule's marks.

    Returns
    -------
    list[ReferenceNodule]
        Sorted by the number of readers (most first), then by position.
    """
    nodules = [m for m in marks if m.kind != "non-nodule"]
    centers = [mark_center(m, geometries) for m in nodules]
    diameters = [mark_diameter(m, geometries) for m in nodules]
    groups: list[list[int]] = [[i] for i in range(len(nodules))]

    def close(a: list[int], b: list[int]) -> bool:
        if {nodules[i].reader for i in a} & {nodules[j].reader for j in b}:
            return False
        return any(
            np.linalg.norm(centers[i] - centers[j])
            < max(diameters[i], diameters[j]) / 2 + tolerance_mm
            for i in a
            for j in b
        )

    merged = True
    while merged:
        merged = False
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                if close(groups[x], groups[y]):
                    groups[x].extend(groups.pop(y))
                    merged = True
                    break
            if merged:
                break

    result = []
    for group in groups:
        outlined = [diameters[i] for i in group if nodules[i].kind == "nodule"]
        result.append(
            ReferenceNodule(
                center=np.mean([centers[i] for i in group], axis=0),
                diameter_mm=float(np.mean(outlined)) if outlined else 0.0,
                readers=len(group),
                contoured=bool(outlined),
                marks=tuple(nodules[i] for i in group),
            )
        )
    result.sort(key=lambda n: (-n.readers, tuple(np.round(n.center, 1))))
    return result


def geometries_of(datasets: Sequence[object]) -> dict[str, Geometry]:
    """Return the image geometry of each dataset by SOP Instance UID.

    Parameters
    ----------
    datasets : sequence of pydicom Dataset
        Headers of the annotated series.

    Returns
    -------
    dict[str, Geometry]
        By SOP Instance UID.
    """
    out = {}
    for ds in datasets:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])  # type: ignore[attr-defined]
        spacing = [float(v) for v in ds.PixelSpacing]  # type: ignore[attr-defined]
        out[str(ds.SOPInstanceUID)] = Geometry(  # type: ignore[attr-defined]
            position=np.asarray([float(v) for v in ds.ImagePositionPatient]),  # type: ignore[attr-defined]
            row_direction=orientation[:3],
            column_direction=orientation[3:],
            spacing=(spacing[0], spacing[1]),
        )
    return out


def nodule_mask(
    marks: Sequence[ReaderMark],
    sop_uids: Sequence[str],
    shape: tuple[int, int],
    min_readers: int = 1,
) -> np.ndarray:
    """Rasterise outlined nodules onto the series' slices.

    A voxel is in the mask when at least ``min_readers`` readers put it inside one of
    their outlines (``min_readers=2`` is a common "50% consensus" reference); exclusion
    outlines punch holes in that reader's region.

    Parameters
    ----------
    marks : sequence of ReaderMark
        Reader marks, usually one consensus nodule's.
    sop_uids : sequence of str
        The series' SOP Instance UIDs in slice order.
    shape : tuple[int, int]
        (rows, columns) of each slice.
    min_readers : int
        Readers that must agree for a voxel to count.

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns)`` bool.
    """
    index = {uid: i for i, uid in enumerate(sop_uids)}
    votes = np.zeros((len(sop_uids), *shape), dtype=np.uint8)
    readers = sorted({m.reader for m in marks if m.kind == "nodule"})
    for reader in readers:
        own = np.zeros_like(votes, dtype=bool)
        for mark in (m for m in marks if m.kind == "nodule" and m.reader == reader):
            for roi in mark.rois:
                if roi.sop_uid not in index or len(roi.points) < 2:
                    continue
                canvas = Image.new("1", (shape[1], shape[0]), 0)
                ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in roi.points], 1, 1)
                filled = np.asarray(canvas, dtype=bool)
                if roi.inclusion:
                    own[index[roi.sop_uid]] |= filled
                else:
                    own[index[roi.sop_uid]] &= ~filled
        votes += own
    return votes >= min_readers


def equivalent_diameter(voxels: int, voxel_volume_mm3: float) -> float:
    """Return the diameter of the sphere with the volume of ``voxels`` voxels, in mm."""
    return float((6.0 * voxels * voxel_volume_mm3 / math.pi) ** (1.0 / 3.0))
