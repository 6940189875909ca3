"""The tests, benchmarks and docs need nothing outside the repository.

The real test data used to live in a folder beside the checkout; it is now under
tests/data. A fresh clone must run everything, so no file may point outside again.
The forbidden strings are built by concatenation so that this file does not match.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.testdata import CT, DATA, MAKE_CT, restore_file

REPO = Path(__file__).resolve().parents[2]
SCANNED = ["tests", "bench", "docs", "dicomnode", "models", "samples", "README.md"]
SKIPPED_DIRS = {"node_modules", "__pycache__", ".pytest_cache"}
FORBIDDEN = [
    ".." + "/shared",  # the old sibling folder, in paths and docs
    "DICOMNODETEST" + "_SHARED",  # the variable that pointed at it
    'parent / "' + "shared",  # the same in pathlib spelling
    '/ ".." / "' + "shared",
]


def text_files() -> list[Path]:
    found = []
    for name in SCANNED:
        top = REPO / name
        if top.is_file():
            found.append(top)
            continue
        for path in top.rglob("*"):
            parts = set(path.relative_to(REPO).parts)
            if path.is_file() and not parts & SKIPPED_DIRS and path.suffix != ".dcm":
                found.append(path)
    return found


def test_nothing_refers_to_data_outside_the_repository() -> None:
    offenders = []
    for path in text_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary: weights, images
        text = data.decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in FORBIDDEN):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


def test_the_data_is_there_with_its_licences() -> None:
    assert (DATA / "ATTRIBUTION.md").is_file()
    assert (CT / "abdomen-ct-j2k" / "LICENSE.txt").is_file()
    assert MAKE_CT.is_file()
    for case, xml, slices in (
        ("LIDC-IDRI-0001", "069.xml", 133),
        ("LIDC-IDRI-0003", "072.xml", 140),
    ):
        assert (CT / case / xml).is_file()
        assert len(list((CT / case).glob("*.dcm"))) == slices
    assert len(list((CT / "abdomen-ct-j2k").glob("CT.*"))) == 20
    pair = CT / "LIDC-IDRI-0132"
    assert (pair / "readers.json").is_file()
    assert sorted(len(list(p.glob("*.dcm"))) for p in pair.iterdir() if p.is_dir()) == [116, 127]


@pytest.mark.parametrize("case", ["LIDC-IDRI-0001", "LIDC-IDRI-0003"])
def test_a_restored_image_is_uncompressed_with_its_uids(case: str, tmp_path: Path) -> None:
    source = sorted((CT / case).glob("*.dcm"))[0]
    compressed = pydicom.dcmread(source)
    assert compressed.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    restore_file(source, tmp_path / source.name)
    restored = pydicom.dcmread(tmp_path / source.name)
    assert restored.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert restored.SOPInstanceUID == compressed.SOPInstanceUID
    assert restored.file_meta.MediaStorageSOPInstanceUID == compressed.SOPInstanceUID
    assert (restored.pixel_array == compressed.pixel_array).all()
