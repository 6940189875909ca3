"""Compressed transfer syntaxes over C-STORE: stored exactly as received, decoded on load.

dcmtk transcodes real LIDC slices (uncompressed, 16-bit signed) and storescu sends them
proposing that syntax. The stored file's transfer syntax and pixel bytes prove the node
kept what it was sent, not a converted copy (an SCU may convert when a compressed context
is refused). Lossless syntaxes must then decode to the original pixels, and to the same
HU volume the pipeline builds from the uncompressed originals.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from sqlalchemy import select

from dicomnode.db import Instance
from dicomnode.imaging import Volume, load_series
from dicomnode.listener import Listener
from tests.dcmtk import STORESCU
from tests.dcmtk import tool as dcmtk_tool
from tests.factories import repaired_j2k_series
from tests.integration.test_listener import sop_of, spool_files

pytestmark = pytest.mark.skipif(
    shutil.which(STORESCU) is None, reason="dcmtk is installed by .ci/run"
)

SLICES = 4  # enough for a volume with real spacing, few enough to keep the module fast

Encoder = Callable[[Path, Path], None]


@pytest.fixture(scope="module")
def lidc_run(lidc1: list[Path]) -> list[Path]:
    """Consecutive slices from the middle of the stack (lungs and body), in position order.

    The file names are not in slice order, and a volume needs evenly spaced slices.
    """
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in lidc1]
    ordered = [lidc1[i] for i in np.argsort(z)]
    middle = len(ordered) // 2
    return ordered[middle : middle + SLICES]


def dcmtk_encoder(name: str, *args: str) -> Encoder:
    def encode(source: Path, dest: Path) -> None:
        proc = subprocess.run(
            [dcmtk_tool(name), *args, str(source), str(dest)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr  # dcmtk says why, e.g. an unsupported image

    return encode


def openjpeg_lossless(source: Path, dest: Path) -> None:
    # dcmtk 3.6 has no JPEG 2000 encoder; pydicom's (pylibjpeg-openjpeg) stands in. It
    # is lossless, so the instance keeps its UID, as dcmtk's lossless encoders do.
    ds = pydicom.dcmread(source)
    ds.compress(uid.JPEG2000Lossless, generate_instance_uid=False)
    ds.save_as(dest, enforce_file_format=True)


def encode_all(encode: Encoder, sources: Sequence[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    sent = [folder / p.name for p in sources]
    for source, dest in zip(sources, sent, strict=True):
        encode(source, dest)
    return sent


def storescu(listener: Listener, propose: str, files: Sequence[Path]) -> None:
    timeouts = ["-to", "20", "-ta", "20", "-td", "20"]  # fail, not hang, if the node stalls
    peer = ["-aec", listener.settings.ae_title, "127.0.0.1", str(listener.port)]
    proc = subprocess.run(
        [STORESCU, propose, *timeouts, *peer, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def assert_stored_as_sent(
    listener: Listener, sessions, sent: Sequence[Path], syntax: str
) -> list[Path]:
    """Check every file arrived unchanged in syntax and pixel bytes; return them in sent order."""
    stored = {sop_of(p): p for p in spool_files(listener)}
    assert len(stored) == len(sent)
    out = []
    for path in sent:
        original = pydicom.dcmread(path)
        # Guards the test itself: the encoder produced the syntax the case is about.
        assert original.file_meta.TransferSyntaxUID == syntax
        copy = pydicom.dcmread(stored[original.SOPInstanceUID])
        assert copy.file_meta.TransferSyntaxUID == syntax
        # For encapsulated syntaxes this is the whole fragment stream, offset table included.
        assert copy.PixelData == original.PixelData
        out.append(stored[original.SOPInstanceUID])
    with sessions() as s:
        assert {r.transfer_syntax_uid for r in s.scalars(select(Instance))} == {syntax}
    return out


def assert_same_volume(got: Volume, expected: Volume) -> None:
    np.testing.assert_array_equal(got.pixels, expected.pixels)
    np.testing.assert_array_equal(got.positions, expected.positions)
    assert [d.SOPInstanceUID for d in got.datasets] == [d.SOPInstanceUID for d in expected.datasets]


@pytest.mark.parametrize(
    ("syntax", "propose", "encode"),
    [
        pytest.param(uid.JPEGLSLossless, "-xt", dcmtk_encoder("dcmcjpls"), id="jpeg-ls"),
        pytest.param(
            uid.JPEGLosslessSV1, "-xs", dcmtk_encoder("dcmcjpeg", "+e1"), id="jpeg-lossless-sv1"
        ),
        pytest.param(uid.RLELossless, "-xr", dcmtk_encoder("dcmcrle"), id="rle"),
        pytest.param(
            uid.DeflatedExplicitVRLittleEndian,
            "-xd",
            dcmtk_encoder("dcmconv", "+td"),
            id="deflated",
        ),
        pytest.param(uid.JPEG2000Lossless, "-xv", openjpeg_lossless, id="jpeg2000"),
    ],
)
def test_lossless_syntax_is_stored_as_sent_and_decodes_exactly(
    listener: Listener,
    sessions,
    lidc_run: list[Path],
    tmp_path: Path,
    syntax: str,
    propose: str,
    encode: Encoder,
) -> None:
    sent = encode_all(encode, lidc_run, tmp_path / "sent")
    storescu(listener, propose, sent)
    stored = assert_stored_as_sent(listener, sessions, sent, syntax)
    for original, path in zip(lidc_run, stored, strict=True):
        expected = pydicom.dcmread(original).pixel_array
        decoded = pydicom.dcmread(path).pixel_array
        assert decoded.dtype == expected.dtype  # signed 16-bit stays signed
        np.testing.assert_array_equal(decoded, expected)
    # What a job sees: the same sorted HU volume as from the uncompressed originals.
    assert_same_volume(load_series(stored), load_series(lidc_run))


def test_real_jpeg2000_series_is_stored_as_sent_and_loads(
    listener: Listener, sessions, data_dir: Path, tmp_path: Path
) -> None:
    # A real export, J2K lossless as it came from the archive: there are no uncompressed
    # originals, so the reference is the sent files as pydicom decodes them.
    source = data_dir / "ct/abdomen-ct-j2k"
    sent = repaired_j2k_series(source, tmp_path / "sent", limit=SLICES)
    for path in sent:  # the repair left the archive's codestream alone
        assert pydicom.dcmread(path).PixelData == pydicom.dcmread(source / path.name).PixelData
    storescu(listener, "-xv", sent)
    stored = assert_stored_as_sent(listener, sessions, sent, uid.JPEG2000Lossless)
    for original, path in zip(sent, stored, strict=True):
        np.testing.assert_array_equal(
            pydicom.dcmread(path).pixel_array, pydicom.dcmread(original).pixel_array
        )
    volume = load_series(stored)
    assert volume.shape == (SLICES, 512, 512)
    assert_same_volume(volume, load_series(sent))
    # Decoded to CT numbers, not noise: air and soft tissue, nothing below the padding.
    assert volume.pixels.min() >= -1024
    assert (volume.pixels < -900).any() and ((volume.pixels > 0) & (volume.pixels < 100)).any()


def test_lossy_jpeg_is_stored_as_sent_and_decodes_close(
    listener: Listener, sessions, lidc_run: list[Path], tmp_path: Path
) -> None:
    # Extended (12-bit) JPEG: dcmcjpeg rescales the 16-bit values to 12 bits and writes
    # the new RescaleSlope/Intercept, so only HU can be compared with the original.
    sent = encode_all(dcmtk_encoder("dcmcjpeg", "+ee"), lidc_run, tmp_path / "sent")
    storescu(listener, "-xx", sent)
    stored = assert_stored_as_sent(listener, sessions, sent, uid.JPEGExtended12Bit)
    for path in stored:
        assert pydicom.dcmread(path).pixel_array.shape == (512, 512)
    got, expected = load_series(stored), load_series(lidc_run)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.positions, expected.positions)
    error = np.abs(got.pixels - expected.pixels)
    # Quality 90 measured about 4 HU mean and 35 HU worst; a wrong decode is off by hundreds.
    assert error.mean() < 10
    assert error.max() < 100
