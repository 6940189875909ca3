"""Copy the real CT test data into ``tests/data/ct``, lossless and proved unchanged.

Usage::

    python tests/data/compress.py SOURCE_CT_DIR [CASE ...]

``SOURCE_CT_DIR`` holds one folder per case as published (the defaults are
LIDC-IDRI-0001, LIDC-IDRI-0003 and abdomen-ct-j2k). For each case:

* an uncompressed image is compressed with dcmtk's ``dcmcjpls`` (JPEG-LS lossless,
  transfer syntax 1.2.840.10008.1.2.4.80; the SOP Instance UID is kept). dcmcjpls
  writes its own Implementation Class UID and Version Name into the file meta; the
  original values are put back, so only the transfer syntax differs;
* an image already compressed losslessly (JPEG-LS, JPEG 2000 lossless) and every
  other file (readers' XML, licence) is copied as it is.

Every compressed file is then checked against its original: the decoded pixels are
equal (pydicom ``pixel_array``), every data element other than Pixel Data is equal,
the file meta differs in the transfer syntax alone, and :func:`tests.testdata.restore_file`
(what the tests use) gives back the original byte for byte. Any difference stops the
script with an error.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.testdata import CT, restore_file  # noqa: E402

DCMCJPLS = "/usr/bin/dcmcjpls"  # dcmtk, by absolute path
CASES = ("LIDC-IDRI-0001", "LIDC-IDRI-0003", "abdomen-ct-j2k")
KEEP_AS_IS = {str(JPEGLSLossless), str(JPEG2000Lossless)}


class NotLossless(RuntimeError):
    """A compressed file does not give back its original."""


def is_dicom(path: Path) -> bool:
    """Tell whether ``path`` is a DICOM file (preamble and ``DICM``).

    Parameters
    ----------
    path : Path
        Any file.

    Returns
    -------
    bool
        True for a DICOM Part 10 file.
    """
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def compress(source: Path, dest: Path) -> None:
    """Compress one uncompressed image to JPEG-LS lossless, keeping its file meta.

    Parameters
    ----------
    source : Path
        The original file.
    dest : Path
        Where to write the compressed file.
    """
    subprocess.run([DCMCJPLS, str(source), str(dest)], check=True, capture_output=True)
    original = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    ds = pydicom.dcmread(dest)
    for keyword in ("ImplementationClassUID", "ImplementationVersionName"):
        if keyword in original:
            setattr(ds.file_meta, keyword, getattr(original, keyword))
        elif keyword in ds.file_meta:
            delattr(ds.file_meta, keyword)
    ds.save_as(dest)


def verify(source: Path, dest: Path) -> None:
    """Prove that ``dest`` holds the same image and header as ``source``.

    Parameters
    ----------
    source : Path
        The original file.
    dest : Path
        Its compressed copy.

    Raises
    ------
    NotLossless
        When the pixels, a header value, or the restored bytes differ.
    """
    a, b = pydicom.dcmread(source), pydicom.dcmread(dest)
    if b.file_meta.TransferSyntaxUID != JPEGLSLossless:
        raise NotLossless(f"{dest}: not JPEG-LS lossless")
    if not np.array_equal(a.pixel_array, b.pixel_array):
        raise NotLossless(f"{dest}: pixels differ from {source}")
    meta_a = {e.tag: e.value for e in a.file_meta if e.keyword != "TransferSyntaxUID"}
    meta_b = {e.tag: e.value for e in b.file_meta if e.keyword != "TransferSyntaxUID"}
    meta_a.pop(0x00020000, None)  # the group length follows the transfer syntax UID's
    meta_b.pop(0x00020000, None)
    if meta_a != meta_b:
        raise NotLossless(f"{dest}: file meta differs from {source}")
    del a.PixelData, b.PixelData
    if a != b:
        raise NotLossless(f"{dest}: a data element differs from {source}")
    with tempfile.TemporaryDirectory() as tmp:
        restored = Path(tmp) / source.name
        restore_file(dest, restored)
        if restored.read_bytes() != source.read_bytes():
            raise NotLossless(f"{dest}: restoring it does not give {source} byte for byte")


def copy_case(source: Path, dest: Path) -> tuple[int, int]:
    """Copy one case folder, compressing and verifying its uncompressed images.

    Parameters
    ----------
    source : Path
        The case folder as published.
    dest : Path
        The case folder under ``tests/data/ct``.

    Returns
    -------
    tuple[int, int]
        How many files were compressed (and verified), and how many copied unchanged.
    """
    dest.mkdir(parents=True, exist_ok=True)
    compressed = copied = 0
    for path in sorted(p for p in source.iterdir() if p.is_file()):
        out = dest / path.name
        syntax = None
        if is_dicom(path):
            syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if syntax is None or syntax in KEEP_AS_IS:
            shutil.copyfile(path, out)
            copied += 1
        else:
            compress(path, out)
            verify(path, out)
            compressed += 1
    return compressed, copied


def main() -> None:
    """Copy the cases named on the command line (or all) into ``tests/data/ct``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with one folder per case")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    for case in args.cases:
        compressed, copied = copy_case(args.source / case, CT / case)
        print(f"{case}: {compressed} compressed and verified, {copied} copied unchanged")


if __name__ == "__main__":
    main()
