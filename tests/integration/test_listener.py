"""The C-STORE SCP over real associations: dcmtk's tools and pynetdicom as peers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, RTPlanStorage
from sqlalchemy import select

from dicomnode.db import Instance, Series
from dicomnode.dimse import statuses
from dicomnode.listener import Listener
from tests.dcmtk import STORESCU
from tests.dcmtk import tool as dcmtk_tool
from tests.factories import ct_series, repaired_j2k_series, write_series

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None, reason="dcmtk is installed by .ci/run"
)


def sop_of(path: Path) -> str:
    return path.stem.split("_")[0]  # incoming/<study>/<series>/<sop>_<token>.dcm


def spool_files(listener: Listener) -> list[Path]:
    return sorted((listener.ingestor.spool.root / "incoming").rglob("*.dcm"))


def dcmtk(tool: str, listener: Listener, *args: str, aec: str = "DICOMNODE") -> int:
    proc = subprocess.run(
        [dcmtk_tool(tool), "-aec", aec, "-to", "20", "127.0.0.1", str(listener.port), *args],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return proc.returncode


J2K = "1.2.840.10008.1.2.4.90"


@pytest.fixture
def raw_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's dataset bytes exactly as they are on disk."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def associate(listener: Listener, *contexts: str, aet: str = "DICOMNODE"):
    ae = AE(ae_title="TESTSCU")
    for context in contexts or (CTImageStorage,):
        # One transfer syntax per context: an acceptor picks one syntax per context.
        ae.add_requested_context(context, ExplicitVRLittleEndian)
        ae.add_requested_context(context, J2K)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae.associate("127.0.0.1", listener.port, ae_title=aet)


def test_echoscu(listener: Listener) -> None:
    assert dcmtk("echoscu", listener) == 0


def test_storescu_stores_every_file_and_row(
    listener: Listener, lidc1: list[Path], sessions
) -> None:
    files = lidc1[:5]
    assert dcmtk("storescu", listener, *map(str, files)) == 0
    stored = spool_files(listener)
    assert len(stored) == 5
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert {sop_of(p) for p in stored} == sent
    with sessions() as s:
        rows = s.scalars(select(Instance)).all()
        assert {r.sop_instance_uid for r in rows} == sent
        assert all(r.calling_ae == "STORESCU" for r in rows)
        assert s.scalars(select(Series)).one().instance_count == 5
    # The stored file holds the same dataset and pixels that were sent.
    original = pydicom.dcmread(files[0])
    copy = pydicom.dcmread(next(p for p in stored if sop_of(p) == original.SOPInstanceUID))
    assert np.array_equal(original.pixel_array, copy.pixel_array)


def test_jpeg2000_is_stored_as_received(listener: Listener, data_dir: Path, tmp_path: Path) -> None:
    files = repaired_j2k_series(data_dir / "ct/abdomen-ct-j2k", tmp_path, limit=4)
    assert dcmtk("storescu", listener, "-xv", *map(str, files)) == 0  # propose J2K lossless
    stored = spool_files(listener)
    assert len(stored) == 4
    for path in stored:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == J2K
        assert ds.pixel_array.shape == (512, 512)


def test_real_export_without_study_uid_is_refused(
    listener: Listener, data_dir: Path, raw_files: None
) -> None:
    # The untouched export has empty Study and Series UIDs: it cannot belong to any
    # series, so it is refused with a status that says why, and nothing is kept.
    path = sorted((data_dir / "ct/abdomen-ct-j2k").glob("CT.*"))[0]
    assert send(listener, path) == statuses.CANNOT_UNDERSTAND_MISSING_UID
    assert spool_files(listener) == []


def test_resend_is_idempotent(listener: Listener, lidc1: list[Path], sessions) -> None:
    assert dcmtk("storescu", listener, str(lidc1[0])) == 0
    assert dcmtk("storescu", listener, str(lidc1[0])) == 0
    with sessions() as s:
        assert len(s.scalars(select(Instance)).all()) == 1


def test_wrong_called_ae_is_rejected(listener: Listener, lidc1: list[Path]) -> None:
    assert dcmtk("echoscu", listener, aec="SOMEONEELSE") != 0
    assoc = associate(listener, aet="SOMEONEELSE")
    assert assoc.is_rejected
    assert spool_files(listener) == []


def test_unsupported_sop_class_is_refused_at_negotiation(listener: Listener) -> None:
    # Alongside a supported class: the association stands, that one context is refused.
    assoc = associate(listener, CTImageStorage, RTPlanStorage)
    assert assoc.is_established
    try:
        assert {c.abstract_syntax for c in assoc.accepted_contexts} == {CTImageStorage}
        assert {c.abstract_syntax for c in assoc.rejected_contexts} == {RTPlanStorage}
    finally:
        assoc.release()
    # Alone: nothing is acceptable, so the association does not stand at all.
    assoc = associate(listener, RTPlanStorage)
    assert not assoc.is_established
    assert {c.abstract_syntax for c in assoc.rejected_contexts} == {RTPlanStorage}
    assert dcmtk("echoscu", listener) == 0  # and the listener is still up


def send(listener: Listener, dataset: Dataset | Path) -> int:
    assoc = associate(listener)
    assert assoc.is_established
    try:
        reply = assoc.send_c_store(dataset)
        return int(reply.Status)
    finally:
        assoc.release()


def one_ct() -> Dataset:
    return ct_series(np.zeros((1, 8, 8), np.float32))[0]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: setattr(d, "SeriesInstanceUID", "../../../../tmp/evil"),
            statuses.CANNOT_UNDERSTAND_INVALID_UID,
        ),
        (
            lambda d: setattr(d, "StudyInstanceUID", "1.2.3/4"),
            statuses.CANNOT_UNDERSTAND_INVALID_UID,
        ),
        (lambda d: delattr(d, "StudyInstanceUID"), statuses.CANNOT_UNDERSTAND_MISSING_UID),
        (lambda d: setattr(d, "SeriesInstanceUID", ""), statuses.CANNOT_UNDERSTAND_MISSING_UID),
    ],
)
def test_bad_identifiers_get_specific_statuses(listener: Listener, mutate, expected: int) -> None:
    ds = one_ct()
    mutate(ds)
    assert send(listener, ds) == expected
    assert spool_files(listener) == []
    assert dcmtk("echoscu", listener) == 0  # the listener is still up


def test_sop_instance_uid_mismatch(listener: Listener, tmp_path: Path, raw_files: None) -> None:
    # The request's Affected SOP Instance UID comes from the file meta; the dataset disagrees.
    ds = one_ct()
    path = write_series([ds], tmp_path)[0]
    raw = pydicom.dcmread(path)
    raw.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    raw.save_as(path)  # as it is: enforcing the format would repair the meta
    assert send(listener, path) == statuses.CANNOT_UNDERSTAND_UID_MISMATCH
    assert spool_files(listener) == []


def _pixel_data_offset(data: bytes) -> int:
    return data.index(b"\xe0\x7f\x10\x00")


@pytest.mark.parametrize("case", ["truncated", "gigabyte-length", "short-pixels"])
def test_truncated_and_lying_datasets(
    listener: Listener, lidc1: list[Path], tmp_path: Path, raw_files: None, case: str
) -> None:
    # With raw_files, pynetdicom sends the dataset bytes as they are on disk.
    data = lidc1[0].read_bytes()
    at = _pixel_data_offset(data)  # explicit VR: tag, "OW", 2 reserved, 4-byte length
    if case == "truncated":
        bad = data[: len(data) // 2]
    elif case == "gigabyte-length":
        bad = data[: at + 8] + (0x7FFFFFF0).to_bytes(4, "little") + data[at + 12 : at + 5000]
    else:  # a consistent element, but fewer pixels than Rows x Columns
        bad = data[: at + 8] + (4000).to_bytes(4, "little") + data[at + 12 : at + 12 + 4000]
    path = tmp_path / "bad.dcm"
    path.write_bytes(bad)
    assert send(listener, path) == statuses.CANNOT_UNDERSTAND_UNREADABLE
    assert spool_files(listener) == []
    assert dcmtk("echoscu", listener) == 0
