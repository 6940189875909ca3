"""A SEG on an enhanced multi-frame CT: real LIDC slices, converted, segmented, validated."""

from __future__ import annotations

import random
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.errors import PermanentJobError
from dicomnode.imaging import Volume
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.outputs import Provenance, build_segmentation
from dicomnode.outputs.seg import labels_in_source_order
from dicomnode.outputs.validate import dciodvfy_errors
from tests.conftest import REPO
from tests.factories import ct_series, legacy_enhanced, lung_phantom

SPEC = load_model_spec(REPO / "models/lung-unet2d")
PROVENANCE = Provenance(model_name=SPEC.name, model_version=SPEC.version)
SLICES = 8


def encode(dataset: Dataset) -> bytes:
    # As the pipeline writes its outputs (a Part 10 file); kept here so these tests
    # do not import the pipeline and everything it pulls in.
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def contiguous_lidc_slices(folder: Path, count: int) -> list[Path]:
    """Return ``count`` adjacent slices from the middle of the series, in file-name order."""
    headers = [(pydicom.dcmread(p, stop_before_pixels=True), p) for p in folder.glob("*.dcm")]
    headers.sort(key=lambda h: float(h[0].ImagePositionPatient[2]))
    middle = len(headers) // 2
    return sorted(p for _, p in headers[middle : middle + count])


def make_seg(volume: Volume, labels: np.ndarray, **kwargs: object) -> hd.seg.Segmentation:
    return build_segmentation(
        volume.datasets,
        labels,
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid("mf", "seg"),
        sop_uid=PROVENANCE.uid("mf", "seg", "i"),
        series_number=9901,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def built(lidc1: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    paths = contiguous_lidc_slices(lidc1[0].parent, SLICES)
    single = volume_from_datasets([pydicom.dcmread(p) for p in paths])
    # Frames in a scrambled order: the volume must sort them, the SEG must undo that.
    order = list(range(SLICES))
    random.Random(7).shuffle(order)
    multi = legacy_enhanced([pydicom.dcmread(p) for p in paths], frame_order=order)
    frame_positions = [
        list(map(float, g.PlanePositionSequence[0].ImagePositionPatient))
        for g in multi.PerFrameFunctionalGroupsSequence
    ]
    volume = volume_from_datasets([multi])
    labels = np.zeros(volume.shape, np.uint8)
    cols = np.arange(volume.shape[2])[None, None, :]
    lung = volume.pixels < -400
    labels[lung & (cols >= 256)] = 1
    labels[lung & (cols < 256)] = 2
    labels[0] = 0  # an empty slice: its frame stays out of the SEG
    labels[3, :, :] = np.where(labels[3] == 1, 0, labels[3])  # one slice with one segment only
    seg = make_seg(volume, labels)
    path = tmp_path_factory.mktemp("mf") / "seg.dcm"
    path.write_bytes(encode(seg))
    return dict(
        single=single,
        volume=volume,
        multi=multi,
        labels=labels,
        seg_path=path,
        frame_positions=frame_positions,
    )


def test_multiframe_volume_equals_the_single_frame_volume(built: dict) -> None:
    single, volume = built["single"], built["volume"]
    assert volume.shape == single.shape == (SLICES, 512, 512)
    np.testing.assert_array_equal(volume.pixels, single.pixels)
    np.testing.assert_allclose(volume.positions, single.positions, atol=1e-4)
    assert volume.pixel_spacing == pytest.approx(single.pixel_spacing)
    assert volume.slice_spacing == pytest.approx(single.slice_spacing)
    assert len(volume.datasets) == 1 and len(single.datasets) == SLICES
    # Each slice's frame came from the single-frame instance at the same position.
    converted = built["multi"].PerFrameFunctionalGroupsSequence
    for k, (_, number) in enumerate(volume.frames):
        source = converted[number - 1].ConversionSourceAttributesSequence[0]
        assert source.ReferencedSOPInstanceUID == single.datasets[k].SOPInstanceUID


def test_seg_frames_reference_the_right_source_frames(built: dict) -> None:
    seg = pydicom.dcmread(built["seg_path"])
    multi, positions = built["multi"], built["frame_positions"]
    numbers_by_slice = [number for _, number in built["volume"].frames]
    labels = built["labels"]
    expected_frames = {
        (numbers_by_slice[k], segment)
        for k in range(SLICES)
        for segment in (1, 2)
        if (labels[k] == segment).any()
    }
    seen = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == multi.SOPInstanceUID
        number = int(source.ReferencedFrameNumber)
        position = list(map(float, frame.PlanePositionSequence[0].ImagePositionPatient))
        np.testing.assert_allclose(position, positions[number - 1], atol=1e-4)
        seen.add((number, int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)))
    assert seen == expected_frames


def test_seg_pixels_equal_the_label_map_per_source_frame(built: dict) -> None:
    seg = hd.seg.segread(built["seg_path"])
    volume, labels = built["volume"], built["labels"]
    numbers = [number for _, number in volume.frames]
    array = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=built["multi"].SOPInstanceUID,
        source_frame_numbers=numbers,
        combine_segments=True,
        skip_overlap_checks=True,
        assert_missing_frames_are_empty=True,  # empty frames are left out of the SEG
    )
    np.testing.assert_array_equal(array, labels)


@pytest.mark.system
def test_dciodvfy_finds_no_errors(built: dict) -> None:
    assert dciodvfy_errors(built["seg_path"]) == []


def test_explicit_frames_give_the_same_seg(built: dict) -> None:
    volume, labels = built["volume"], built["labels"]
    derived = labels_in_source_order(volume.datasets, labels)
    given = labels_in_source_order(volume.datasets, labels, volume.frames)
    np.testing.assert_array_equal(derived, given)
    numbers = [number for _, number in volume.frames]
    np.testing.assert_array_equal(derived[np.asarray(numbers) - 1], labels)


def test_labels_that_do_not_fit_the_frames_are_refused(built: dict) -> None:
    volume = built["volume"]
    with pytest.raises(PermanentJobError, match=f"7 label slices do not match the {SLICES} frames"):
        labels_in_source_order(volume.datasets, np.zeros((7, 512, 512), np.uint8))


def _two_instance_volume() -> tuple[Volume, list[Dataset]]:
    series = ct_series(lung_phantom(slices=6, size=16))
    parts = [legacy_enhanced(series[:3]), legacy_enhanced(series[3:])]
    return volume_from_datasets(parts), parts


def test_several_multiframe_instances_cannot_share_one_seg() -> None:
    volume, _ = _two_instance_volume()
    labels = (volume.pixels < -800).astype(np.uint8)
    with pytest.raises(PermanentJobError, match="a series of 2 multi-frame instances"):
        make_seg(volume, labels, frames=volume.frames)


def test_single_frame_label_count_mismatch_is_refused() -> None:
    volume = volume_from_datasets(ct_series(lung_phantom(slices=4, size=16)))
    with pytest.raises(PermanentJobError, match="3 label slices for 4 source images"):
        make_seg(volume, np.zeros((3, 16, 16), np.uint8))


@pytest.mark.system
def test_sr_on_a_multiframe_source_lists_it_as_evidence(built: dict, tmp_path: Path) -> None:
    from dicomnode.imaging import segment_stats
    from dicomnode.outputs import build_measurement_report

    volume, labels = built["volume"], built["labels"]
    names = [s.label for s in SPEC.output.segments]
    stats = segment_stats(labels, volume.pixels, volume.voxel_volume_ml, names)
    seg = hd.seg.segread(built["seg_path"])
    report = build_measurement_report(
        seg,
        volume.datasets,
        stats,
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid("mf", "sr"),
        sop_uid=PROVENANCE.uid("mf", "sr", "i"),
        series_number=9902,
    )
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(report))
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in pydicom.dcmread(path).CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {built["multi"].SOPInstanceUID, seg.SOPInstanceUID}
    assert dciodvfy_errors(path) == []
