"""The source series' grid that every reference is laid on: slices, positions, pixels.

It comes from the source images themselves (``--images``, exact and complete) or from
our SEG, whose frames carry each framed source slice's position, the shared
orientation and the pixel measures. A SEG leaves out empty frames, so a grid derived
from it knows only the framed slices; :meth:`SourceGrid.extended` adds slices on the
same regular lattice (without a source UID) where a reference needs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.evaluate.lidc import Geometry


@dataclass(frozen=True)
class SourceGrid:
    """Slices of one series in body order (along the slice normal)."""

    series_uid: str
    sop_uids: list[str]  # "" for a lattice slice with no known source instance
    positions: np.ndarray  # (slices, 3) ImagePositionPatient, LPS mm
    row_direction: np.ndarray  # direction of increasing column index
    column_direction: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    shape: tuple[int, int]  # (rows, columns)
    slice_spacing: float  # nominal gap between slices, for the lattice and HD95
    files: dict[str, Path] = field(default_factory=dict)  # source files, for plots

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row x column direction)."""
        n = np.cross(self.row_direction, self.column_direction)
        return n / np.linalg.norm(n)

    @property
    def offsets(self) -> np.ndarray:
        """Each slice's position along the normal, in mm."""
        return np.asarray(self.positions @ self.normal, dtype=float)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice gap, row spacing, column spacing) in mm; the gap is the median one."""
        gaps = np.diff(self.offsets)
        gap = float(np.median(gaps)) if gaps.size else self.slice_spacing
        return (gap or self.slice_spacing, *self.pixel_spacing)

    def geometries(self) -> dict[str, Geometry]:
        """Return the geometry of each slice with a known source instance, by SOP UID."""
        return {
            uid: Geometry(
                position=self.positions[k],
                row_direction=self.row_direction,
                column_direction=self.column_direction,
                spacing=self.pixel_spacing,
            )
            for k, uid in enumerate(self.sop_uids)
            if uid
        }

    def extended(self, low: float, high: float) -> SourceGrid:
        """Return the grid with lattice slices added so that it covers ``[low, high]``.

        Parameters
        ----------
        low, high : float
            Offsets along the normal (mm) that must lie within the grid.

        Returns
        -------
        SourceGrid
            The same slices plus new ones (SOP UID "") on the lattice through the first
            slice, ``slice_spacing`` apart, in body order.
        """
        offsets = self.offsets
        step = self.slice_spacing
        origin = self.positions[0]
        first = int(np.floor((min(low, offsets.min()) - offsets[0]) / step + 1e-3))
        last = int(np.ceil((max(high, offsets.max()) - offsets[0]) / step - 1e-3))
        uids, positions = list(self.sop_uids), [p for p in self.positions]
        for k in range(first, last + 1):
            where = offsets[0] + k * step
            if np.min(np.abs(offsets - where)) > step / 4:
                uids.append("")
                positions.append(origin + k * step * self.normal)
        order = np.argsort(np.asarray(positions) @ self.normal, kind="stable")
        return SourceGrid(
            series_uid=self.series_uid,
            sop_uids=[uids[i] for i in order],
            positions=np.asarray(positions)[order],
            row_direction=self.row_direction,
            column_direction=self.column_direction,
            pixel_spacing=self.pixel_spacing,
            shape=self.shape,
            slice_spacing=self.slice_spacing,
            files=self.files,
        )

    def pixel_positions(self, k: int) -> np.ndarray:
        """Return the LPS position of every pixel of slice ``k``, shape (rows, columns, 3)."""
        rows, cols = self.shape
        r = np.arange(rows, dtype=float)[:, None, None] * self.pixel_spacing[0]
        c = np.arange(cols, dtype=float)[None, :, None] * self.pixel_spacing[1]
        return self.positions[k] + c * self.row_direction + r * self.column_direction


def grid_from_datasets(
    datasets: Sequence[pydicom.Dataset], files: Sequence[Path] | None = None
) -> SourceGrid:
    """Return the grid of one series from its images' headers.

    Parameters
    ----------
    datasets : sequence of pydicom.Dataset
        The series' images (headers suffice).
    files : sequence of Path, optional
        Their files, in the same order, kept for plots.

    Returns
    -------
    SourceGrid
        All slices in body order.
    """
    first = datasets[0]
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    uids = [str(datasets[i].SOPInstanceUID) for i in order]
    spacing = [float(v) for v in first.PixelSpacing]
    gaps = np.diff(positions[order] @ normal)
    nominal = float(np.median(gaps)) if gaps.size else float(first.get("SliceThickness") or 1.0)
    return SourceGrid(
        series_uid=str(first.SeriesInstanceUID),
        sop_uids=uids,
        positions=positions[order],
        row_direction=orientation[:3],
        column_direction=orientation[3:],
        pixel_spacing=(spacing[0], spacing[1]),
        shape=(int(first.Rows), int(first.Columns)),
        slice_spacing=nominal or 1.0,
        files={}
        if files is None
        else {str(ds.SOPInstanceUID): f for ds, f in zip(datasets, files, strict=True)},
    )


def grids_from_folders(folders: Iterable[Path]) -> dict[str, SourceGrid]:
    """Read the image headers under ``folders`` and return a grid per series.

    Parameters
    ----------
    folders : iterable of Path
        Folders (searched recursively) or single files.

    Returns
    -------
    dict[str, SourceGrid]
        By Series Instance UID; files that are not DICOM images are skipped.
    """
    by_series: dict[str, list[tuple[pydicom.Dataset, Path]]] = {}
    for folder in folders:
        paths = (
            [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        )
        for path in paths:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # not DICOM: a folder may hold anything
                continue
            if "ImagePositionPatient" not in ds or "PixelSpacing" not in ds or "Rows" not in ds:
                continue  # SEG, SR and other non-image objects
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append((ds, path))
    return {
        uid: grid_from_datasets([d for d, _ in items], [p for _, p in items])
        for uid, items in by_series.items()
    }


def grid_from_seg(seg: pydicom.Dataset) -> SourceGrid | None:
    """Return the grid of the source slices that ``seg`` has frames for.

    Parameters
    ----------
    seg : pydicom.Dataset
        A DICOM SEG with per-frame plane positions and source image references.

    Returns
    -------
    SourceGrid or None
        The framed slices in body order; None if the SEG lacks the geometry.
    """
    try:
        shared = seg.SharedFunctionalGroupsSequence[0]
        orientation = np.asarray(
            [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
        )
        measures = shared.PixelMeasuresSequence[0]
        spacing = [float(v) for v in measures.PixelSpacing]
        between = measures.get("SpacingBetweenSlices") or measures.get("SliceThickness")
        series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    found: dict[str, np.ndarray] = {}
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        try:
            position = np.asarray(
                [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            )
            for derivation in frame.DerivationImageSequence:
                for source in derivation.SourceImageSequence:
                    found[str(source.ReferencedSOPInstanceUID)] = position
        except (AttributeError, IndexError):
            continue
    if not found:
        return None
    uids = list(found)
    positions = np.asarray([found[u] for u in uids])
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort(positions @ normal, kind="stable")
    gaps = np.diff(np.sort(positions @ normal))
    gaps = gaps[gaps > 1e-3]
    nominal = float(between) if between else float(np.min(gaps)) if gaps.size else 1.0
    return SourceGrid(
        series_uid=series_uid,
        sop_uids=[uids[i] for i in order],
        positions=positions[order],
        row_direction=orientation[:3],
        column_direction=orientation[3:],
        pixel_spacing=(spacing[0], spacing[1]),
        shape=(int(seg.Rows), int(seg.Columns)),
        slice_spacing=nominal,
    )
