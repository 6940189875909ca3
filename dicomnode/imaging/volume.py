"""Series -> volume: the one place that knows DICOM image geometry.

Every model and every output uses the :class:`Volume` built here: slices sorted
by position along the slice normal, values rescaled to Hounsfield units (or the
modality's real values), and the geometry needed to map voxels back to patient
space and masks back onto the exact source frames.

A series is either single-frame instances (CT Image, MR Image: one slice each) or
enhanced multi-frame instances (Enhanced CT, Enhanced MR, Legacy Converted
Enhanced CT: many slices each, with their geometry in the functional groups). Both
become the same list of frames, which is sorted and checked as one.
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
        The distinct source headers (pixel data dropped), in the order in which
        their first slice appears in ``pixels``. For a series of single-frame
        instances that is one header per slice, in the order of ``pixels``; for
        multi-frame instances it is one header per instance (often just one), and
        ``frames`` says which frame of which header each slice is.
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
    frames : tuple[tuple[int, int], ...]
        For each slice, ``(index into datasets, frame number)``; frame numbers
        start at 1 as in DICOM (ReferencedFrameNumber), and are 1 for single-frame
        instances.
    """

    pixels: np.ndarray
    datasets: list[Dataset]
    row_direction: np.ndarray
    column_direction: np.ndarray
    normal: np.ndarray
    positions: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    frames: tuple[tuple[int, int], ...]

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

    @property
    def is_multiframe(self) -> bool:
        """Return whether the slices come from enhanced multi-frame instances."""
        return any(is_enhanced(ds) for ds in self.datasets)

    def source_of(self, index: int) -> tuple[Dataset, int]:
        """Return the source header and frame number of one slice.

        Parameters
        ----------
        index : int
            Slice index into ``pixels``.

        Returns
        -------
        tuple[Dataset, int]
            The header and the frame number in it (1 for single-frame instances).
        """
        source, number = self.frames[index]
        return self.datasets[source], number

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


@dataclass(frozen=True)
class _Frame:
    """One slice as found in the input, before sorting."""

    source: int  # index into the input datasets
    number: int  # frame number in that instance, from 1
    orientation: np.ndarray
    position: np.ndarray
    spacing: np.ndarray
    thickness: float | None
    slope: float
    intercept: float


def is_enhanced(ds: Dataset) -> bool:
    """Return whether an instance keeps its geometry in multi-frame functional groups.

    Enhanced CT and MR and the Legacy Converted Enhanced images do, even with a
    single frame; classic CT and MR images do not.

    Parameters
    ----------
    ds : Dataset
        An image header.

    Returns
    -------
    bool
        True if it has a Per-Frame or Shared Functional Groups Sequence.
    """
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _what(ds: Dataset, number: int | None) -> str:
    # Names the instance (and frame) in messages: UIDs only, never patient data.
    where = f"instance {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
    return where if number is None else f"{where} frame {number}"


def _floats(ds: Dataset, keyword: str, count: int, what: str | None = None) -> np.ndarray:
    value = ds.get(keyword)
    try:
        if value is not None and len(value) == count:
            return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        pass  # an empty or non-numeric value: reported below like a missing one
    raise PermanentJobError(f"{what or _what(ds, None)}: {keyword} is missing or malformed")


def _number(item: Dataset | None, keyword: str, default: float) -> float:
    value = None if item is None else item.get(keyword)
    return float(value) if value not in (None, "") else default


def _functional_item(ds: Dataset, per_frame: Dataset | None, keyword: str) -> Dataset | None:
    """Return the one item of a functional group macro for a frame.

    The per-frame group wins; the shared group applies to every frame that lacks it
    (PS3.3 C.7.6.16: a macro is in one of the two, not both).
    """
    for group in (per_frame, _shared(ds)):
        if group is not None and keyword in group and len(group[keyword].value) > 0:
            item: Dataset = group[keyword].value[0]
            return item
    return None


def _shared(ds: Dataset) -> Dataset | None:
    shared = ds.get("SharedFunctionalGroupsSequence")
    return shared[0] if shared else None


def _single_frame(ds: Dataset, source: int) -> _Frame:
    thickness = ds.get("SliceThickness")
    return _Frame(
        source=source,
        number=1,
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=_floats(ds, "ImagePositionPatient", 3),
        spacing=_floats(ds, "PixelSpacing", 2),
        thickness=float(thickness) if thickness not in (None, "") else None,
        slope=_number(ds, "RescaleSlope", 1.0) or 1.0,
        intercept=_number(ds, "RescaleIntercept", 0.0),
    )


def _enhanced_frames(ds: Dataset, source: int) -> list[_Frame]:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != count:
        raise PermanentJobError(
            f"{_what(ds, None)}: Per-Frame Functional Groups Sequence has {len(per_frame)} "
            f"items for {count} frames"
        )
    frames = []
    for number, group in enumerate(per_frame, start=1):
        what = _what(ds, number)
        orientation = _functional_item(ds, group, "PlaneOrientationSequence")
        position = _functional_item(ds, group, "PlanePositionSequence")
        measures = _functional_item(ds, group, "PixelMeasuresSequence")
        # Enhanced MR may leave the transformation out: its values are not rescaled.
        rescale = _functional_item(ds, group, "PixelValueTransformationSequence")
        thickness = _number(measures, "SliceThickness", 0.0)
        frames.append(
            _Frame(
                source=source,
                number=number,
                orientation=_floats(orientation or Dataset(), "ImageOrientationPatient", 6, what),
                position=_floats(position or Dataset(), "ImagePositionPatient", 3, what),
                spacing=_floats(measures or Dataset(), "PixelSpacing", 2, what),
                thickness=thickness or None,
                slope=_number(rescale, "RescaleSlope", 1.0) or 1.0,
                intercept=_number(rescale, "RescaleIntercept", 0.0),
            )
        )
    return frames


def _frames_of(ds: Dataset, source: int) -> list[_Frame]:
    if is_enhanced(ds):
        return _enhanced_frames(ds, source)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        # Without functional groups a multi-frame image has one position for all
        # its frames (NM, old cine MR): nothing says where each slice lies.
        raise PermanentJobError(
            f"{_what(ds, None)}: multi-frame image without per-frame functional groups "
            "(no position per frame) is not supported"
        )
    return [_single_frame(ds, source)]


def _decoded(ds: Dataset, count: int) -> np.ndarray:
    """Return the stored values as ``(frames, rows, columns)``."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID", "unknown") if meta is not None else "unknown"
        raise PermanentJobError(
            f"{_what(ds, None)}: cannot decode pixel data "
            f"(transfer syntax {syntax}): {type(exc).__name__}"
        ) from None
    expected = (count, int(ds.Rows), int(ds.Columns))
    if pixels.ndim == 2 and count == 1:
        pixels = pixels[np.newaxis]  # pydicom drops the frame axis of a single frame
    if pixels.shape != expected:
        raise PermanentJobError(
            f"{_what(ds, None)}: expected {count} grey-scale frame(s), "
            f"got pixel array of shape {pixels.shape}"
        )
    return pixels


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


def _check_consistent(datasets: Sequence[Dataset], frames: Sequence[_Frame]) -> None:
    first = frames[0]
    shape = (int(datasets[0].Rows), int(datasets[0].Columns))
    for ds in datasets[1:]:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise PermanentJobError("series mixes matrix sizes")
    for frame in frames[1:]:
        if np.abs(frame.orientation - first.orientation).max() > _ORIENTATION_TOLERANCE:
            raise PermanentJobError("series mixes slice orientations")
        if np.abs(frame.spacing - first.spacing).max() > 1e-4:
            raise PermanentJobError("series mixes pixel spacings")


def _sorted_frames(frames: Sequence[_Frame]) -> tuple[list[_Frame], np.ndarray]:
    """Sort frames along the normal of the first; return them and their distances."""
    iop = frames[0].orientation
    normal = np.cross(iop[:3], iop[3:])
    along = np.array([f.position @ normal for f in frames])
    # Stable, so equal positions keep input order and a single instance's frames
    # sort the same way here as in build_segmentation's frame_order.
    order = np.argsort(along, kind="stable")
    return [frames[i] for i in order], along[order]


def frame_order(ds: Dataset) -> list[int]:
    """Return the frame numbers of one multi-frame instance in volume (slice) order.

    This is the order :func:`volume_from_datasets` gives the slices of a series of
    that one instance, so a mask on its volume can be put back in frame order.

    Parameters
    ----------
    ds : Dataset
        An enhanced multi-frame header.

    Returns
    -------
    list[int]
        Frame numbers (from 1), one per slice of the volume.

    Raises
    ------
    PermanentJobError
        If the frames' geometry is missing.
    """
    ordered, _ = _sorted_frames(_frames_of(ds, 0))
    return [f.number for f in ordered]


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    """Build a :class:`Volume` from a series' instances in any order.

    Parameters
    ----------
    datasets : Sequence[Dataset]
        One series' instances, with pixel data: single-frame images, or enhanced
        multi-frame images (each frame a slice). Their pixel data is released
        once decoded, to keep memory at one copy of the volume.

    Returns
    -------
    Volume
        The sorted, rescaled volume.

    Raises
    ------
    PermanentJobError
        If the series has no images, mixed orientations or matrix sizes, missing
        geometry or pixel data, two slices at one position, gantry tilt, uneven
        spacing, multi-frame instances without per-frame geometry, or pixel data
        that cannot be decoded.
    """
    if not datasets:
        raise PermanentJobError("series has no instances")
    frames: list[_Frame] = []
    for source, ds in enumerate(datasets):
        _fill_identity_from_meta(ds)
        if "PixelData" not in ds:
            # Checked before anything is decoded: pydicom would only say AttributeError.
            raise PermanentJobError(f"{_what(ds, None)}: has no pixel data")
        frames.extend(_frames_of(ds, source))
    _check_consistent(datasets, frames)

    ordered, along = _sorted_frames(frames)
    first = ordered[0]
    iop = first.orientation
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.stack([f.position for f in ordered])

    if len(ordered) > 1:
        gaps = np.diff(along)
        if gaps.min() < 1e-3:
            # Enhanced MR often holds several echoes, phases or stacks in one instance.
            hint = " (several stacks, echoes or phases?)" if len(frames) > len(datasets) else ""
            raise PermanentJobError(f"series has two slices at the same position{hint}")
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
        slice_spacing = first.thickness or 1.0

    # Distinct sources in the order their first slice appears: for single-frame
    # series exactly one header per slice, in slice order, as callers expect.
    index_of: dict[int, int] = {}
    for frame in ordered:
        index_of.setdefault(frame.source, len(index_of))
    sources = list(index_of)

    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    pixels = np.empty((len(ordered), rows, columns), dtype=np.float32)
    slices_of: dict[int, list[tuple[int, _Frame]]] = {s: [] for s in sources}
    for k, frame in enumerate(ordered):
        slices_of[frame.source].append((k, frame))
    for source in sources:
        ds = datasets[source]
        count = int(ds.NumberOfFrames) if is_enhanced(ds) else 1
        stored = _decoded(ds, count)
        for k, frame in slices_of[source]:
            pixels[k] = stored[frame.number - 1].astype(np.float32) * np.float32(
                frame.slope
            ) + np.float32(frame.intercept)
        del stored
        # Headers stay for the outputs; the encoded pixels (and pydicom's decoded
        # cache, which goes with them) are no longer needed.
        if "PixelData" in ds:
            del ds.PixelData

    return Volume(
        pixels=pixels,
        datasets=[datasets[s] for s in sources],
        row_direction=row_dir,
        column_direction=col_dir,
        normal=normal,
        positions=positions,
        pixel_spacing=(float(first.spacing[0]), float(first.spacing[1])),
        slice_spacing=slice_spacing,
        frames=tuple((index_of[f.source], f.number) for f in ordered),
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
