"""The Secondary Capture overlay: a valid RGB multi-frame SC in the source's study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.imaging import load_registry
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.outputs import Provenance, build_overlay_capture
from dicomnode.outputs.overlay import contour_mask
from dicomnode.outputs.sc import SC_CLASS, overlay_slices
from dicomnode.outputs.validate import dciodvfy_errors, own_check_errors
from dicomnode.pipeline import encode
from tests.factories import ct_series, legacy_enhanced, lung_phantom

SPEC = load_registry(None)["lung-unet2d"]
PROVENANCE = Provenance(model_name=SPEC.name, model_version=SPEC.version)
SUMMARY = {
    "segments": [
        {"label": "Left lung", "volume_ml": 10.5, "mean": -850.0},
        {"label": "Right lung", "volume_ml": 11.25, "mean": -849.0},
    ]
}


def phantom(slices: int = 20, size: int = 128, **kwargs: object):
    hu = lung_phantom(slices=slices, size=size)
    sources = ct_series(hu, **kwargs)  # type: ignore[arg-type]
    labels = np.zeros(hu.shape, np.uint8)
    lung = hu == -850.0
    cols = np.arange(size)[None, None, :]
    labels[lung & (cols >= size // 2)] = 1
    labels[lung & (cols < size // 2)] = 2
    return sources, labels


def build(volume, labels, provenance: Provenance = PROVENANCE, version: str = "v1"):
    return build_overlay_capture(
        volume,
        labels,
        SPEC.output.segments,
        provenance,
        series_uid=provenance.uid("series", "sc"),
        sop_uid=provenance.uid("series", version, "sc"),
        series_number=1003,
        summary=SUMMARY,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    sources, labels = phantom()
    volume = volume_from_datasets(sources)
    ds = build(volume, labels)
    path = tmp_path_factory.mktemp("sc") / "sc.dcm"
    path.write_bytes(encode(ds))
    return {"sources": sources, "labels": labels, "volume": volume, "path": path, "ds": ds}


@pytest.mark.system
def test_sc_passes_dciodvfy(built) -> None:
    assert dciodvfy_errors(built["path"]) == []


def test_sc_is_rgb_multiframe_of_the_slices_with_segments(built) -> None:
    ds = pydicom.dcmread(built["path"])
    assert ds.SOPClassUID == SC_CLASS == "1.2.840.10008.5.1.4.1.1.7.4"
    assert ds.file_meta.MediaStorageSOPClassUID == SC_CLASS
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert (ds.Rows, ds.Columns) == (128, 128)
    shown = overlay_slices(built["labels"])
    assert shown == list(range(1, 19))  # the phantom's first and last slices are empty
    assert ds.NumberOfFrames == len(shown)
    assert ds.pixel_array.shape == (len(shown), 128, 128, 3)
    assert ds.BurnedInAnnotation == "YES" and ds.Manufacturer == "dicomnode"
    assert ds.Modality == "OT" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.SeriesDescription == "AI lung-unet2d overlay - RESEARCH, NOT FOR CLINICAL USE"
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "dicomnode"
    assert list(ds.PatientOrientation) == ["L", "P"]
    assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.8]


def test_sc_is_in_the_source_study_and_references_each_frames_source(built) -> None:
    ds = pydicom.dcmread(built["path"])
    sources = built["sources"]
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.PatientID == sources[0].PatientID
    assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    shown = overlay_slices(built["labels"])
    volume = built["volume"]
    expected = [volume.datasets[k].SOPInstanceUID for k in shown]
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == expected
    assert {i.ReferencedSOPClassUID for i in ds.SourceImageSequence} == {sources[0].SOPClassUID}
    locations = [float(np.dot(volume.positions[k], volume.normal)) for k in shown]
    np.testing.assert_allclose([float(v) for v in ds.SliceLocationVector], locations, atol=1e-3)


def test_sc_frames_carry_the_outlines_in_the_segment_colours(built) -> None:
    ds = pydicom.dcmread(built["path"])
    shown = overlay_slices(built["labels"])
    labels = built["labels"][shown]
    frames = ds.pixel_array
    edge = contour_mask(labels, 1)  # 128 px images: 1 px outlines
    for number, segment in enumerate(SPEC.output.segments, start=1):
        on_edge = edge & (labels == number)
        on_edge[:, :40, :] = False  # the legend sits in the top left corner
        on_edge[:, 110:, :] = False  # the notice along the bottom
        assert on_edge.any()
        assert (frames[on_edge] == segment.color).all()


def test_sc_uids_are_deterministic_and_the_pixels_too(built) -> None:
    again = build(built["volume"], built["labels"])
    first = built["ds"]
    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert again.SeriesInstanceUID == first.SeriesInstanceUID
    assert again.PixelData == first.PixelData
    newer = build(built["volume"], built["labels"], version="v2")
    assert newer.SeriesInstanceUID == first.SeriesInstanceUID  # replaces, same series
    assert newer.SOPInstanceUID != first.SOPInstanceUID


@pytest.mark.system
def test_a_clinical_model_has_no_notice(built, tmp_path: Path) -> None:
    clinical = Provenance(model_name="m", model_version="1", clinical_use=True)
    ds = build(built["volume"], built["labels"], provenance=clinical)
    assert ds.SeriesDescription == "AI m overlay"
    assert "ImageComments" not in ds
    research = built["ds"].pixel_array
    assert not np.array_equal(ds.pixel_array[:, 115:, :], research[:, 115:, :])
    path = tmp_path / "sc.dcm"
    path.write_bytes(encode(ds))
    assert dciodvfy_errors(path) == []


def test_a_short_series_is_shown_whole() -> None:
    sources, labels = phantom(slices=6, size=64)
    ds = build(volume_from_datasets(sources), labels)
    assert ds.NumberOfFrames == 6


@pytest.mark.system
def test_multiframe_source_frames_are_referenced_by_number(tmp_path: Path) -> None:
    sources, labels = phantom(slices=16, size=64)
    enhanced = legacy_enhanced(sources, frame_order=list(reversed(range(16))))
    volume = volume_from_datasets([enhanced])
    ds = build(volume, labels)
    items = ds.SourceImageSequence
    assert {i.ReferencedSOPInstanceUID for i in items} == {enhanced.SOPInstanceUID}
    shown = overlay_slices(labels)
    assert [int(i.ReferencedFrameNumber) for i in items] == [volume.frames[k][1] for k in shown]
    path = tmp_path / "sc.dcm"
    path.write_bytes(encode(ds))
    assert dciodvfy_errors(path) == []


def test_labels_must_match_the_volume(built) -> None:
    with pytest.raises(ValueError, match="do not match"):
        build(built["volume"], built["labels"][:3])


def test_our_own_checks_decode_the_overlay(built, tmp_path: Path) -> None:
    assert own_check_errors(built["path"]) == []
    broken = pydicom.dcmread(built["path"])
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]
    path = tmp_path / "broken.dcm"
    broken.save_as(path)
    assert own_check_errors(path)
