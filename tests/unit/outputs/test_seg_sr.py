"""SEG and SR built from a phantom, round-tripped through bytes, read back and validated."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.imaging import load_registry, segment_stats
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.outputs import Provenance, build_measurement_report, build_segmentation
from dicomnode.outputs.validate import dciodvfy_errors
from dicomnode.pipeline import encode
from tests.factories import ct_series, lung_phantom

SPEC = load_registry(None)["lung-unet2d"]
PROVENANCE = Provenance(model_name=SPEC.name, model_version=SPEC.version)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    hu = lung_phantom(slices=10, size=48)
    sources = ct_series(hu, orientation=(1, 0, 0, 0, 0.8, -0.6), spacing=(0.7, 0.7))
    source_positions = {d.SOPInstanceUID: list(map(float, d.ImagePositionPatient)) for d in sources}
    volume = volume_from_datasets(sources)
    labels = np.zeros(hu.shape, np.uint8)
    lung = hu == -850.0
    cols = np.arange(hu.shape[2])[None, None, :]
    labels[lung & (cols >= 24)] = 1  # +x half: patient's left
    labels[lung & (cols < 24)] = 2
    labels[0] = 0  # an empty frame stays out of the SEG
    seg = build_segmentation(
        volume.datasets,
        labels,
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid("s", "seg"),
        sop_uid=PROVENANCE.uid("i", "seg"),
        series_number=9901,
    )
    stats = segment_stats(
        labels, volume.pixels, volume.voxel_volume_ml, ["Left lung", "Right lung"]
    )
    report = build_measurement_report(
        seg,
        volume.datasets,
        stats,
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid("s", "sr"),
        sop_uid=PROVENANCE.uid("i", "sr"),
        series_number=9902,
    )
    folder = tmp_path_factory.mktemp("out")
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    seg_path.write_bytes(encode(seg))
    sr_path.write_bytes(encode(report))
    return dict(
        volume=volume,
        labels=labels,
        stats=stats,
        seg_path=seg_path,
        sr_path=sr_path,
        source_positions=source_positions,
        sources=sources,
    )


def test_seg_round_trips_with_segments_and_codes(built) -> None:
    seg = hd.seg.segread(built["seg_path"])
    assert seg.SeriesDescription.endswith("RESEARCH, NOT FOR CLINICAL USE")
    assert seg.ContentDescription == "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
    assert seg.SegmentationType == "BINARY"
    descs = {d.SegmentNumber: d for d in seg.SegmentSequence}
    assert descs[1].SegmentLabel == "Left lung" and descs[2].SegmentLabel == "Right lung"
    assert descs[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    assert descs[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "3341006"
    assert descs[1].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    algo = descs[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "lung-unet2d" and algo.AlgorithmVersion == SPEC.version
    assert (
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID == built["sources"][0].SeriesInstanceUID
    )


def test_seg_frames_sit_on_the_source_positions(built) -> None:
    seg = pydicom.dcmread(built["seg_path"])
    positions = built["source_positions"]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = (
            frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        )
        position = list(map(float, frame.PlanePositionSequence[0].ImagePositionPatient))
        np.testing.assert_allclose(position, positions[source_uid], atol=1e-4)


def test_seg_pixels_equal_the_label_map(built) -> None:
    seg = hd.seg.segread(built["seg_path"])
    labels = built["labels"]
    uids = [d.SOPInstanceUID for d in built["volume"].datasets]
    array = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(array, labels)


def test_sr_measurements_match_an_independent_computation(built) -> None:
    report = hd.sr.srread(built["sr_path"])
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    assert report.SeriesDescription.endswith("RESEARCH, NOT FOR CLINICAL USE")
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    volume, labels = built["volume"], built["labels"]
    voxel_ml = np.prod(volume.pixel_spacing) * volume.slice_spacing / 1000
    for group in groups:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == pydicom.dcmread(built["seg_path"]).SOPInstanceUID
        number = ref.referenced_segment_numbers[0]
        assert ref.source_series_for_segmentation.value == built["sources"][0].SeriesInstanceUID
        mask = labels == number
        by_name = {
            (m.name.meaning, m.derivation and m.derivation.meaning): m
            for m in group.get_measurements()
        }
        assert by_name[("Volume", None)].value == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
        assert by_name[("Volume", None)].unit.value == "mL"
        mean = by_name[("Attenuation Coefficient", "Mean")]
        assert mean.unit.value == "[hnsf'U]"
        assert mean.value == pytest.approx(float(volume.pixels[mask].mean()), abs=1e-2)
        std = by_name[("Attenuation Coefficient", "Standard Deviation")]
        assert std.value == pytest.approx(float(volume.pixels[mask].std()), abs=1e-2)


def test_evidence_lists_the_seg_and_every_source(built) -> None:
    ds = pydicom.dcmread(built["sr_path"])
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    expected = {d.SOPInstanceUID for d in built["sources"]}
    expected.add(pydicom.dcmread(built["seg_path"]).SOPInstanceUID)
    assert evidence == expected


@pytest.mark.system
@pytest.mark.parametrize("name", ["seg_path", "sr_path"])
def test_dciodvfy_finds_no_errors(built, name: str) -> None:
    assert dciodvfy_errors(built[name]) == []


def test_uids_are_deterministic() -> None:
    a = Provenance("m", "1").uid("1.2.3", "seg")
    assert a == Provenance("m", "1").uid("1.2.3", "seg")
    assert a != Provenance("m", "1").uid("1.2.3", "sr")
    assert Provenance("m", "1", uid_root="1.2.999.").uid("x").startswith("1.2.999.")


def test_encode_round_trip(built) -> None:
    data = built["seg_path"].read_bytes()
    assert data[128:132] == b"DICM"
    assert pydicom.dcmread(BytesIO(data)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.mark.system
def test_dciodvfy_reports_a_broken_object(built, tmp_path: Path) -> None:
    ds = pydicom.dcmread(built["seg_path"])
    del ds.SegmentSequence
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    assert any("SegmentSequence" in e or "Segment Sequence" in e for e in dciodvfy_errors(broken))


def test_sr_findings_carry_the_seg_segments_tracking_uids(built) -> None:
    seg = pydicom.dcmread(built["seg_path"])
    by_number = {int(d.SegmentNumber): d.TrackingUID for d in seg.SegmentSequence}
    groups = hd.sr.srread(built["sr_path"]).content.get_volumetric_roi_measurement_groups()
    for group in groups:
        number = group.referenced_segment.referenced_segment_numbers[0]
        assert group.tracking_uid == by_number[number]


@pytest.mark.system
def test_non_conformant_source_values_are_repaired(tmp_path: Path) -> None:
    from dicomnode.outputs import repair_source_headers

    sources = ct_series(lung_phantom(slices=3, size=16))
    sources[0].PatientBirthDate = "1970013"
    sources[1].StudyTime = "25:99"
    for ds in sources:
        ds.AccessionNumber = "A" * 30  # SH allows 16
    assert repair_source_headers(sources) == 2 + 3
    assert sources[0].PatientBirthDate == "" and sources[1].StudyTime == ""
    assert sources[2].StudyDate == "20240101"  # good values stay
    assert all(ds.AccessionNumber == "A" * 16 for ds in sources)
    # The SEG built from them validates.
    volume = volume_from_datasets(sources)
    seg = build_segmentation(
        volume.datasets,
        (volume.pixels < -800).astype(np.uint8),
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid("r", "seg"),
        sop_uid=PROVENANCE.uid("r", "i"),
        series_number=9901,
    )
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode(seg))
    assert dciodvfy_errors(path) == []
