"""Series -> volume: the one place that knows DICOM image geometry.

Every model and every output uses the :class:`Volume` built here: slices sorted
by position along the slice normal, values rescaled to Hounsfield units (or the
modality's real values), and the geometry needed to map voxels back to patient
space and masks back onto the exact source frames.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.errors import PermanentJobError

log = logging.getLogger(__name__)

_ORIENTATION_TOLERANCE = 1e-3  # direction cosines; about 0.06 degrees
_SPACING_TOLERANCE = 0.1  # relative deviation of a slice gap from the median gap
_TILT_TOLERANCE = 1e-2  # |sin| of the angle between slice stacking and the normal


@dataclass(frozen=True)
class Volume:
    """A sorted, rescaled image volume and its geometry (patient coordinates are LPS).

    Attributes
    ----------
    pixels : np.ndarray
        ``(slices, rows, columns)`` float32, rescaled (HU for CT).
    datasets : list[Dataset]
        The source headers in the same order as ``pixels`` (pixel data dropped).
    row_direction : np.ndarray
        Unit vector along a row (increasing column index), from ImageOrientationPatient.
    column_direction : np.ndarray
        Unit vector down a column (increasing row index).
    normal : np.ndarray
        ``row_direction x column_direction``; slices are sorted along it.
    positions : np.ndarray
        ``(slices, 3)`` ImagePositionPatient of each slice, in order.
    pixel_spacing : tuple[float, float]
        (row spacing, column spacing) in mm, as in PixelSpacing.
    slice_spacing : float
        Distance between slice centres along the normal in mm (the median gap);
        SliceThickness (or 1.0) for a single slice.
    """

    pixels: np.ndarray
    datasets: list[Dataset]
    row_direction: np.ndarray
    column_direction: np.ndarray
    normal: np.ndarray
    positions: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """Return ``(slices, rows, columns)``."""
        rows_cols: tuple[int, int, int] = self.pixels.shape  # always 3-D
        return rows_cols

    @property
    def voxel_volume_ml(self) -> float:
        """Return the volume of one voxel in millilitres."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0

    @property
    def modality(self) -> str:
        """Return the Modality of the series."""
        return str(self.datasets[0].get("Modality", ""))

    def patient_x(self, indices: np.ndarray) -> np.ndarray:
        """Return the patient-space x (the patient's left is +x) of voxel indices.

        Parameters
        ----------
        indices : np.ndarray
            ``(N, 3)`` integer ``(slice, row, column)`` indices.

        Returns
        -------
        np.ndarray
            ``(N,)`` x coordinates in mm.
        """
        return self.to_patient(indices)[:, 0]

    def to_patient(self, indices: np.ndarray) -> np.ndarray:
        """Map voxel indices to patient coordinates (LPS, mm).

        Parameters
        ----------
        indices : np.ndarray
            ``(N, 3)`` ``(slice, row, column)`` indices; fractional values are allowed.

        Returns
        -------
        np.ndarray
            ``(N, 3)`` points in mm.
        """
        idx = np.asarray(indices, dtype=np.float64).reshape(-1, 3)
        k = idx[:, 0]
        k0 = np.clip(np.floor(k).astype(int), 0, len(self.positions) - 1)
        # Use each slice's own position: exact even where the spacing is not perfectly even.
        base = self.positions[k0] + np.outer(k - k0, self.normal * self.slice_spacing)
        return (
            base
            + np.outer(idx[:, 1] * self.pixel_spacing[0], self.column_direction)
            + np.outer(idx[:, 2] * self.pixel_spacing[1], self.row_direction)
        )


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise PermanentJobError(f"instance {ds.SOPInstanceUID}: {keyword} is missing or malformed")
    return np.array([float(v) for v in value], dtype=np.float64)


def _rescaled(ds: Dataset) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise PermanentJobError(
            f"instance {ds.SOPInstanceUID}: cannot decode pixel data "
            f"(transfer syntax {syntax}): {type(exc).__name__}"
        ) from None
    if pixels.ndim != 2:
        raise PermanentJobError(
            f"instance {ds.SOPInstanceUID}: expected one grey-scale frame, "
            f"got pixel array of shape {pixels.shape}"
        )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _fill_identity_from_meta(ds: Dataset) -> None:
    """Copy SOP class and instance UIDs from the file meta when the dataset lacks them.

    Some exports keep them only in the meta group; our outputs must reference them.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
    if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    """Build a :class:`Volume` from single-frame datasets in any order.

    Parameters
    ----------
    datasets : Sequence[Dataset]
        One series' instances, with pixel data. Their pixel data is released
        once decoded, to keep memory at one copy of the volume.

    Returns
    -------
    Volume
        The sorted, rescaled volume.

    Raises
    ------
    PermanentJobError
        If the series has no images, mixed orientations or matrix sizes, missing
        geometry, two slices at one position, gantry tilt, uneven spacing,
        multi-frame instances, or pixel data that cannot be decoded.
    """
    if not datasets:
        raise PermanentJobError("series has no instances")
    for ds in datasets:
        _fill_identity_from_meta(ds)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise PermanentJobError(
                f"instance {ds.SOPInstanceUID}: multi-frame images are not supported yet"
            )
    first = datasets[0]
    iop = _floats(first, "ImageOrientationPatient", 6)
    spacing = _floats(first, "PixelSpacing", 2)
    shape = (int(first.Rows), int(first.Columns))
    for ds in datasets[1:]:
        if np.abs(_floats(ds, "ImageOrientationPatient", 6) - iop).max() > _ORIENTATION_TOLERANCE:
            raise PermanentJobError("series mixes slice orientations")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise PermanentJobError("series mixes matrix sizes")
        if np.abs(_floats(ds, "PixelSpacing", 2) - spacing).max() > 1e-4:
            raise PermanentJobError("series mixes pixel spacings")

    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    positions = positions[order]
    ordered = [datasets[i] for i in order]

    if len(ordered) > 1:
        gaps = np.diff(along)
        if gaps.min() < 1e-3:
            raise PermanentJobError("series has two slices at the same position")
        slice_spacing = float(np.median(gaps))
        if np.abs(gaps - slice_spacing).max() > _SPACING_TOLERANCE * slice_spacing:
            raise PermanentJobError(
                f"series has uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm)"
            )
        stack = positions[-1] - positions[0]
        sin = np.linalg.norm(np.cross(stack / np.linalg.norm(stack), normal))
        if sin > _TILT_TOLERANCE:
            tilt = float(np.degrees(np.arcsin(min(float(sin), 1.0))))
            raise PermanentJobError(
                f"series is tilted (gantry tilt about {tilt:.1f} degrees); not supported yet"
            )
    else:
        slice_spacing = float(first.get("SliceThickness", 1.0) or 1.0)

    pixels = np.empty((len(ordered), *shape), dtype=np.float32)
    for i, ds in enumerate(ordered):
        pixels[i] = _rescaled(ds)
        # Headers stay for the outputs; the encoded pixels (and pydicom's decoded
        # cache, which goes with them) are no longer needed.
        if "PixelData" in ds:
            del ds.PixelData

    return Volume(
        pixels=pixels,
        datasets=ordered,
        row_direction=row_dir,
        column_direction=col_dir,
        normal=normal,
        positions=positions,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_spacing=slice_spacing,
    )


def load_series(paths: Sequence[Path]) -> Volume:
    """Read a series' files and build its :class:`Volume`.

    Parameters
    ----------
    paths : Sequence[Path]
        The instance files, in any order.

    Returns
    -------
    Volume
        The sorted, rescaled volume.

    Raises
    ------
    PermanentJobError
        If a file is unreadable or the series cannot form a volume.
    """
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:
            raise PermanentJobError(f"cannot read {path.name}: {type(exc).__name__}") from None
    return volume_from_datasets(datasets)
