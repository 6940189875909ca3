"""A SEG read back into the labels it was built from, for every encoding a route can choose.

A detection job reuses a lung job's mask by reading its SEG: the labels must come
back exactly, whatever the encoding, and a SEG of another grid must be refused.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import SegOptions
from dicomnode.errors import UnusableSeg
from dicomnode.imaging import Volume
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.outputs import Provenance, build_segmentation, read_labels
from tests.conftest import REPO
from tests.factories import ct_series, legacy_enhanced, lung_phantom

SPEC = load_model_spec(REPO / "models/lung-unet2d")
PROVENANCE = Provenance(model_name=SPEC.name, model_version=SPEC.version)
NAMES = [s.label for s in SPEC.output.segments]
ENCODINGS = [
    SegOptions(type=t, compression=c, empty_frames=e)
    for t, compressions in (
        ("binary", ("none", "jpeg2000")),
        ("labelmap", ("none", "jpeg2000", "jpeg-ls", "rle")),
    )
    for c in compressions
    for e in (False, True)
]


def phantom_labels(volume: Volume) -> np.ndarray:
    """Left and right 'lungs' on the middle slices, empty slices at both ends."""
    labels = np.zeros(volume.shape, np.uint8)
    lung = volume.pixels < -500
    half = volume.shape[2] // 2
    labels[:, :, half:][lung[:, :, half:]] = 1
    labels[:, :, :half][lung[:, :, :half]] = 2
    labels[:2] = 0
    labels[-1] = 0
    return labels


def write_seg(volume: Volume, labels: np.ndarray, options: SegOptions, path: Path) -> Path:
    seg = build_segmentation(
        volume.datasets,
        labels,
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid("s", "seg"),
        sop_uid=PROVENANCE.uid("i", "seg"),
        series_number=9901,
        frames=volume.frames,
        options=options,
    )
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    return path


def files(datasets: list[Dataset]) -> list[bytes]:
    out = []
    for ds in datasets:
        buffer = BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def volume_of(files: list[bytes]) -> Volume:
    # Read anew each time: a volume keeps its headers, without their pixel data.
    return volume_from_datasets([pydicom.dcmread(BytesIO(f)) for f in files])


@pytest.fixture(scope="module")
def series() -> list[bytes]:
    return files(ct_series(lung_phantom(slices=10, size=48)))


@pytest.fixture(scope="module")
def single_frame(series: list[bytes]) -> Volume:
    return volume_of(series)


@pytest.fixture(scope="module")
def multi_frame() -> Volume:
    datasets = ct_series(lung_phantom(slices=10, size=48))
    # Frames stored top to bottom: the volume's slice order is not the frame order.
    return volume_from_datasets([legacy_enhanced(datasets, frame_order=range(9, -1, -1))])


@pytest.mark.parametrize("options", ENCODINGS, ids=str)
@pytest.mark.parametrize("source", ["single_frame", "multi_frame"])
def test_every_encoding_reads_back_exactly(
    source: str, options: SegOptions, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    volume: Volume = request.getfixturevalue(source)
    labels = phantom_labels(volume)
    assert set(np.unique(labels)) == {0, 1, 2}
    got = read_labels(write_seg(volume, labels, options, tmp_path / "seg.dcm"), volume, NAMES)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, labels)


@pytest.mark.parametrize("options", [SegOptions(), SegOptions(type="labelmap")], ids=str)
def test_an_empty_mask_reads_back_empty(
    single_frame: Volume, options: SegOptions, tmp_path: Path
) -> None:
    labels = np.zeros(single_frame.shape, np.uint8)
    path = write_seg(single_frame, labels, options, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_labels(path, single_frame, NAMES), labels)


def test_a_seg_of_another_grid_is_refused(
    series: list[bytes], single_frame: Volume, tmp_path: Path
) -> None:
    path = write_seg(single_frame, phantom_labels(single_frame), SegOptions(), tmp_path / "s.dcm")

    with pytest.raises(UnusableSeg, match="other source instances"):
        read_labels(path, volume_of(series[1:]), NAMES)
    other = volume_of(files(ct_series(lung_phantom(slices=10, size=48))))
    with pytest.raises(UnusableSeg, match="another series"):
        read_labels(path, other, NAMES)
    smaller = volume_of(files(ct_series(lung_phantom(slices=10, size=32))))
    with pytest.raises(UnusableSeg, match="the SEG is 48x48, the series 32x32"):
        read_labels(path, smaller, NAMES)
    with pytest.raises(UnusableSeg, match="other segment"):
        read_labels(path, single_frame, ["Lung"])


def test_a_missing_or_broken_file_is_refused(single_frame: Volume, tmp_path: Path) -> None:
    with pytest.raises(UnusableSeg, match="the SEG file is gone"):
        read_labels(tmp_path / "none.dcm", single_frame, NAMES)
    path = write_seg(single_frame, phantom_labels(single_frame), SegOptions(), tmp_path / "s.dcm")
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(UnusableSeg, match=r"does not (read|decode)"):
        read_labels(path, single_frame, NAMES)
    ct = tmp_path / "ct.dcm"
    pydicom.dcmwrite(ct, single_frame.datasets[0], enforce_file_format=True)
    with pytest.raises(UnusableSeg, match=r"the SEG does not read \("):
        read_labels(ct, single_frame, NAMES)
