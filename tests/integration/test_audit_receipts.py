"""The listener's audit entries over real associations (dcmtk and pynetdicom as senders)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.db import audit
from tests.conftest import wait_for
from tests.dcmtk import STORESCU
from tests.factories import ct_series, write_series

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None, reason="dcmtk is installed by .ci/run"
)


def storescu(port: int, files: list[Path], aet: str) -> int:
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", "DICOMNODE", "-to", "10", "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, timeout=60, check=False,
    ).returncode  # fmt: skip


def trail(sessions, *events: str) -> list[dict]:
    with sessions() as s:
        return list(audit.entries(s, events=events))


def test_receipts_refusals_and_rejections(make_listener, sessions, tmp_path: Path) -> None:
    listener = make_listener()
    first = write_series(ct_series(np.zeros((3, 8, 8))), tmp_path / "a")
    second = write_series(ct_series(np.zeros((2, 8, 8))), tmp_path / "b")
    assert storescu(listener.port, [*first, *second], "CT01") == 0
    assert storescu(listener.port, first[:1], "CT01") == 0  # an identical resend

    assert wait_for(lambda: len(trail(sessions, "instances-received")) == 3, 10)
    received = trail(sessions, "instances-received")
    by_series = {(r["series_uid"], r["count"], r["detail"]) for r in received}
    assert {r["actor"] for r in received} == {"CT01"}
    assert {r["peer"] for r in received} == {"127.0.0.1"}
    assert by_series == {
        (_series_of(first[0]), 3, None),
        (_series_of(second[0]), 2, None),
        (_series_of(first[0]), 1, "1 identical resend(s)"),
    }
    assert all(r["size_bytes"] > 0 for r in received)

    # Refusals: counted per association, with the first reason and status.
    bad = ct_series(np.zeros((2, 8, 8)))
    for ds in bad:
        ds.SeriesInstanceUID = "1.2.3/../4"
    ae = AE(ae_title="MR02")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in bad] == [0xC212, 0xC212]
    finally:
        assoc.release()
    assert wait_for(lambda: trail(sessions, "instances-refused") != [], 10)
    [refused] = trail(sessions, "instances-refused")
    assert (refused["actor"], refused["count"], refused["outcome"]) == ("MR02", 2, "failure")
    assert refused["detail"].startswith("first: 0xC212")

    # A sender calling the wrong AE title is turned away, and that is recorded too.
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assert not ae.associate("127.0.0.1", listener.port, ae_title="NOTUS").is_established
    assert wait_for(lambda: trail(sessions, "association-rejected") != [], 10)
    [rejected] = trail(sessions, "association-rejected")
    assert rejected["actor"] == "INTRUDER" and rejected["peer"] == "127.0.0.1"
    assert rejected["detail"] == "calling_ae='INTRUDER' called_ae='NOTUS' reason=called_ae"


def _series_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
