"""Synthetic DICOM for tests: small CT series with exactly the geometry asked for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ct_slice(
    pixels: np.ndarray,
    *,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    spacing: Sequence[float] = (0.8, 0.8),
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    number: int,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    patient_name: str = "TEST^PATIENT",
    patient_id: str = "PID-TEST-0001",
    sop_uid: str | None = None,
) -> Dataset:
    """Return one CT image; ``pixels`` are stored values (before rescale)."""
    sop = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def ct_series(
    hu: np.ndarray,
    *,
    orientation: Sequence[float] = AXIAL,
    spacing: Sequence[float] = (0.8, 0.8),
    slice_spacing: float = 2.0,
    origin: Sequence[float] = (-100.0, -100.0, -50.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    positions: Callable[[int], Sequence[float]] | None = None,
    **kwargs: object,
) -> list[Dataset]:
    """Return a series whose slice ``k`` holds ``hu[k]`` at ``origin + k*spacing*normal``."""
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(hu.shape[0]):
        pos = positions(k) if positions else np.asarray(origin) + k * slice_spacing * normal
        stored = np.round((hu[k] - intercept) / slope)
        out.append(
            ct_slice(
                stored,
                position=pos,
                orientation=orientation,
                spacing=spacing,
                study_uid=study,
                series_uid=series,
                frame_uid=frame,
                number=k + 1,
                slope=slope,
                intercept=intercept,
                modality=modality,
                **kwargs,  # type: ignore[arg-type]
            )
        )
    return out


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write datasets as Part 10 files and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def lung_phantom(slices: int = 12, size: int = 64) -> np.ndarray:
    """HU volume: soft-tissue body, two air-filled 'lungs' left and right, air outside."""
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    vol = np.full((slices, size, size), -1000.0, np.float32)
    c = size / 2
    body = ((x - c) / (0.45 * size)) ** 2 + ((y - c) / (0.35 * size)) ** 2 <= 1
    vol[body] = 40.0
    for side in (-1, 1):
        lung = ((x - c - side * 0.2 * size) / (0.12 * size)) ** 2 + (
            (y - c) / (0.22 * size)
        ) ** 2 <= 1
        vol[lung & (z > 0) & (z < slices - 1)] = -850.0
    return vol


def repaired_j2k_series(source: Path, dest: Path, limit: int | None = None) -> list[Path]:
    """Copy the real JPEG 2000 abdomen CT with the identifiers its export blanked.

    Its datasets have empty SOP Class, SOP Instance, Study and Series UIDs (they live
    only in the file meta, or nowhere). The pixel data stays JPEG 2000, untouched.
    """
    dest.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for path in sorted(source.glob("CT.*"))[:limit]:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.save_as(dest / path.name, enforce_file_format=True)
        out.append(dest / path.name)
    return out


def legacy_enhanced(
    datasets: Sequence[Dataset], *, frame_order: Sequence[int] | None = None
) -> Dataset:
    """Convert single-frame CT images into one Legacy Converted Enhanced CT image.

    Frame ``i`` of the result is ``datasets[frame_order[i]]`` (the input order by
    default): highdicom is told not to sort, so tests choose the frame order.
    """
    import highdicom as hd

    order = list(range(len(datasets))) if frame_order is None else list(frame_order)
    first = datasets[0]
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        [datasets[i] for i in order],
        series_instance_uid=str(first.SeriesInstanceUID),
        series_number=int(first.get("SeriesNumber", 1) or 1),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        include_dimension_index=False,
    )
    # Round trip through bytes: the node only ever sees what a file holds.
    buffer = BytesIO()
    converted.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def add_series(
    session: object, study_uid: str = "1.2.3", series_uid: str = "1.2.3.4", **study: object
) -> object:
    """Add a study and one CT series to an open transaction; return the (flushed) series.

    ``study`` sets Study columns such as ``patient_id`` and ``accession_number``.
    """
    from dicomnode.db import Series, Study

    row = Study(study_uid=study_uid, **study)
    session.add(row)  # type: ignore[attr-defined]
    session.flush()  # type: ignore[attr-defined]
    series = Series(study_id=row.id, series_uid=series_uid, modality="CT")
    session.add(series)  # type: ignore[attr-defined]
    session.flush()  # type: ignore[attr-defined]
    return series
