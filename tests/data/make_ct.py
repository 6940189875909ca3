#!/usr/bin/env python3
"""Write a synthetic but realistic CT series (int16, HU: body, two lungs, spine, noise).

For load tests and benchmarks that need a series of any size::

    python tests/data/make_ct.py OUTDIR [--slices 120] [--size 512] [--seed 0]

Every run makes new Study, Series and SOP Instance UIDs; the same seed gives the
same pixels. Files are Explicit VR Little Endian, named ``0000.dcm`` upwards.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def phantom(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Make the volume in HU: air, an elliptic body, two lungs, a spine, and noise.

    Parameters
    ----------
    n : int
        Number of slices.
    size : int
        Rows and columns of each slice.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    numpy.ndarray
        ``(n, size, size)`` float32 values clipped to [-1024, 3071].
    """
    z, y, x = np.mgrid[0:n, 0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    vol = np.full((n, size, size), -1000.0, np.float32)  # air
    body = ((x - cx) / (0.42 * size)) ** 2 + ((y - cy) / (0.32 * size)) ** 2 <= 1
    vol[body] = 40.0  # soft tissue
    for side in (-1, 1):
        lx = cx + side * 0.2 * size
        zz = (z - n / 2) / (0.45 * n)
        lung = ((x - lx) / (0.13 * size)) ** 2 + ((y - cy) / (0.2 * size)) ** 2 + zz**2 <= 1
        vol[lung] = -850.0
    spine = ((x - cx) ** 2 + (y - (cy + 0.22 * size)) ** 2) <= (0.05 * size) ** 2
    vol[spine] = 700.0
    vol += rng.normal(0, 20, vol.shape).astype(np.float32)
    return np.clip(vol, -1024, 3071)


def write_series(
    out: Path, slices: int, size: int = 512, seed: int = 0, patient: str = "SYNTH^CT"
) -> str:
    """Write one synthetic axial CT series, one file per slice.

    Parameters
    ----------
    out : Path
        The folder to write into; made if missing.
    slices : int
        Number of slices (2.5 mm apart).
    size : int
        Rows and columns (0.7 mm pixels).
    seed : int
        Seeds the noise; also names the patient ID and accession number.
    patient : str
        Patient's Name.

    Returns
    -------
    str
        The new Study Instance UID.
    """
    out.mkdir(parents=True, exist_ok=True)
    vol = phantom(slices, size, np.random.default_rng(seed))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime.now()
    for i in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.PatientName = patient
        ds.PatientID = f"SYN{seed:04d}"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.AccessionNumber = f"ACC{seed:04d}"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDescription = "Synthetic chest"
        ds.Manufacturer = "synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-0.35 * size, -0.35 * size, -i * 2.5]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = vol[i].astype(np.int16).tobytes()
        ds.save_as(out / f"{i:04d}.dcm", enforce_file_format=True)
    return str(study)


def main() -> None:
    """Parse the command line and write the series."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patient", default="SYNTH^CT")
    args = parser.parse_args()
    study = write_series(args.out, args.slices, args.size, args.seed, args.patient)
    print(f"{args.slices} slices -> {args.out} study={study}")


if __name__ == "__main__":
    main()
