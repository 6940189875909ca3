"""A very large multi-frame instance is received without being held in memory.

`dicomnode listen` runs as its own process; dcmtk's storescu sends it a 256 MiB
Enhanced CT. With pynetdicom's default receive path the dataset would sit in memory
two or three times over; ours streams it to the spool, so the node's peak resident
memory must grow by far less than the instance's size.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.db import make_engine
from tests.conftest import memory_bytes
from tests.dcmtk import STORESCU
from tests.factories import ct_series
from tests.integration.node_process import NodeProcess, listener_port, write_config

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None, reason="dcmtk is installed by .ci/run"
)

FRAMES, SIZE = 512, 512  # 512 frames of 512 x 512 x 16 bit = 256 MiB of pixel data


def tail_digest(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(-length, 2)
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def big_multiframe(path: Path) -> pydicom.Dataset:
    ds = ct_series(np.zeros((1, SIZE, SIZE), np.float32))[0]
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.NumberOfFrames = FRAMES
    frames = np.arange(FRAMES * SIZE * SIZE, dtype=np.int16).reshape(FRAMES, SIZE, SIZE)
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_large_multiframe_is_streamed_to_disk(tmp_path: Path) -> None:
    source = tmp_path / "big.dcm"
    sent = big_multiframe(source)
    config = write_config(
        tmp_path, db_url=f"sqlite:///{tmp_path / 'node.db'}", pacs_port=9, quiet_seconds=3600
    )
    with NodeProcess(config, command="listen") as node:
        assert node.proc is not None
        before = memory_bytes(node.proc.pid)
        proc = subprocess.run(
            [STORESCU, "-aec", "DICOMNODE", "-to", "60", "-td", "120", "127.0.0.1",
             str(listener_port(config)), str(source)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        growth = memory_bytes(node.proc.pid) - before
    stored = list((tmp_path / "spool" / "incoming").rglob("*.dcm"))
    assert len(stored) == 1
    # The file meta is the listener's own; the dataset, pixel data last, is as sent.
    pixels = FRAMES * SIZE * SIZE * 2
    assert tail_digest(stored[0], pixels) == tail_digest(source, pixels)
    stored_size = stored[0].stat().st_size
    back = pydicom.dcmread(stored[0], stop_before_pixels=True)
    assert back.SOPInstanceUID == sent.SOPInstanceUID
    assert int(back.NumberOfFrames) == FRAMES
    with make_engine(f"sqlite:///{tmp_path / 'node.db'}").connect() as conn:
        assert conn.exec_driver_sql("SELECT size_bytes FROM instances").scalar() == stored_size
    print(f"peak RSS growth {growth / 2**20:.1f} MiB receiving {stored_size / 2**20:.0f} MiB")
    # Holding the dataset even once would cost 256 MiB; streaming costs a few PDUs.
    assert growth < 64 * 2**20, f"peak memory grew by {growth / 2**20:.0f} MiB"
