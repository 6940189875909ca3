"""SEG encodings per route and the SR's measurements, on real CT slices of LIDC-IDRI-0001.

Each SEG is written, validated (our checks, and dciodvfy where it knows the IOD), read
back with highdicom and compared with the mask that went in. The SR's volume, mean,
standard deviation and %LAA-950 are checked against numpy on the mask read back from
the SEG and the HU read from the source files: an independent computation.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicomnode.config import SegOptions, parse_settings
from dicomnode.errors import ConfigError, PermanentJobError
from dicomnode.imaging import load_series, segment_stats
from dicomnode.imaging.manifest import load_model_spec, shipped_models_path
from dicomnode.outputs import (
    Provenance,
    build_measurement_report,
    build_segmentation,
    validate_file,
)
from dicomnode.outputs.codes import LAA_950
from dicomnode.outputs.validate import own_check_errors
from dicomnode.pipeline import encode

SPEC = load_model_spec(shipped_models_path() / "lung-unet2d")
PROVENANCE = Provenance(model_name=SPEC.name, model_version=SPEC.version)


@pytest.fixture(scope="module")
def case(lidc1: list[Path]):
    by_height = sorted(
        lidc1,
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    volume = load_series(by_height[60:72])  # 12 neighbouring slices through the lungs
    hu = volume.pixels
    # A crude lung mask split at the image centre: low density inside the body box.
    rows, cols = np.mgrid[0 : hu.shape[1], 0 : hu.shape[2]]
    body = (rows > 120) & (rows < 400) & (cols > 60) & (cols < 450)
    lung = (hu < -400) & body[None]
    labels = np.zeros(hu.shape, np.uint8)
    labels[lung & (cols[None] >= 256)] = 1  # image right: patient's left
    labels[lung & (cols[None] < 256)] = 2
    labels[:2] = 0  # empty frames at one end
    return volume, labels


def build(volume, labels, options: SegOptions, folder: Path) -> Path:
    seg = build_segmentation(
        volume.datasets,
        labels,
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid("s", "seg"),
        sop_uid=PROVENANCE.uid("i", "seg", options.type, options.compression),
        series_number=9901,
        frames=volume.frames,
        options=options,
    )
    path = folder / f"{options.type}-{options.compression}-{options.empty_frames}.dcm"
    path.write_bytes(encode(seg))
    return path


def read_back(path: Path, volume) -> np.ndarray:
    seg = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=[1, 2],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    return np.asarray(masks, dtype=np.uint8)


@pytest.mark.system
@pytest.mark.parametrize(
    ("options", "sop_class", "dciodvfy_ran"),
    [
        (SegOptions(), "1.2.840.10008.5.1.4.1.1.66.4", True),
        (SegOptions(compression="jpeg2000"), "1.2.840.10008.5.1.4.1.1.66.4", True),
        (SegOptions(empty_frames=True), "1.2.840.10008.5.1.4.1.1.66.4", True),
        (SegOptions(type="labelmap"), "1.2.840.10008.5.1.4.1.1.66.7", False),
        (SegOptions(type="labelmap", compression="jpeg-ls"), "1.2.840.10008.5.1.4.1.1.66.7", False),
        (SegOptions(type="labelmap", compression="rle"), "1.2.840.10008.5.1.4.1.1.66.7", False),
        (
            SegOptions(type="labelmap", compression="jpeg2000"),
            "1.2.840.10008.5.1.4.1.1.66.7",
            False,
        ),
    ],
)
def test_each_encoding_validates_and_round_trips(
    case, tmp_path: Path, options: SegOptions, sop_class: str, dciodvfy_ran: bool
) -> None:
    volume, labels = case
    path = build(volume, labels, options, tmp_path)
    # dciodvfy does not know Label Map Segmentation yet: our own checks stand alone.
    assert validate_file(path, "dciodvfy") is dciodvfy_ran
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == sop_class
    slices = labels.shape[0]
    if options.type == "binary":
        present = sum(int((labels[k] == s).any()) for k in range(slices) for s in (1, 2))
        expected_frames = 2 * slices if options.empty_frames else present
    else:
        expected_frames = slices if options.empty_frames else int(labels.any(axis=(1, 2)).sum())
    assert int(ds.NumberOfFrames) == expected_frames
    np.testing.assert_array_equal(read_back(path, volume), labels)


def test_compression_shrinks_the_seg(case, tmp_path: Path) -> None:
    volume, labels = case
    plain = build(volume, labels, SegOptions(), tmp_path).stat().st_size
    packed = build(volume, labels, SegOptions(compression="jpeg2000"), tmp_path).stat().st_size
    assert packed < plain / 5


def test_a_binary_seg_cannot_take_rle_or_jpeg_ls() -> None:
    route = {"name": "r", "match": {}, "models": ["lung-unet2d"], "send_to": [],
             "seg": {"compression": "rle"}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"routes\[0\].seg.compression: rle needs seg.type"):
        parse_settings({"routes": [route]}, environ={})
    route["seg"] = {"type": "labelmap", "compression": "rle", "empty_frames": True}
    settings = parse_settings({"routes": [route]}, environ={})
    assert settings.routes[0].seg == SegOptions("labelmap", "rle", True)


@pytest.mark.system
def test_sr_measurements_equal_numpy_on_the_seg_read_back(case, tmp_path: Path) -> None:
    volume, labels = case
    seg_path = build(volume, labels, SegOptions(), tmp_path)
    seg = pydicom.dcmread(seg_path)
    stats = segment_stats(labels, volume.pixels, volume.voxel_volume_ml, ["L", "R"])
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
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(encode(report))
    assert validate_file(sr_path, "dciodvfy")

    # Independent: the mask from the SEG file, HU straight from the source files.
    mask = read_back(seg_path, volume)
    hu = np.stack(
        [
            pydicom.dcmread(p).pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
            for p, d in zip(sorted_paths(volume), volume.datasets, strict=True)
        ]
    )
    voxel_ml = float(np.prod(volume.pixel_spacing)) * volume.slice_spacing / 1000
    content = hd.sr.srread(sr_path).content
    groups = {g.tracking_identifier: g for g in content.get_volumetric_roi_measurement_groups()}
    for number, name in ((1, "Left lung"), (2, "Right lung")):
        values = hu[mask == number]
        group = groups[name]
        measured = {
            (m.name.meaning, None if m.derivation is None else m.derivation.meaning): float(m.value)
            for m in group.get_measurements()
        }
        assert measured[("Volume", None)] == pytest.approx(values.size * voxel_ml, abs=1e-3)
        assert measured[("Attenuation Coefficient", "Mean")] == pytest.approx(
            values.mean(), abs=1e-3
        )
        assert measured[("Attenuation Coefficient", "Standard Deviation")] == pytest.approx(
            values.std(), abs=1e-3
        )
        laa = group.get_measurements(name=LAA_950)[0]
        assert float(laa.value) == pytest.approx(100 * (values < -950).mean(), abs=1e-3)
        assert laa.unit == codes.UCUM.Percent


def sorted_paths(volume) -> list[Path]:
    """The source files in the volume's slice order (their headers carry the path)."""
    return [Path(str(ds.filename)) for ds in volume.datasets]


def test_own_checks_catch_what_dciodvfy_might_be_missing_for(case, tmp_path: Path) -> None:
    volume, labels = case
    path = build(volume, labels, SegOptions(), tmp_path)
    assert own_check_errors(path) == []
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    bad = tmp_path / "bad-meta.dcm"
    ds.save_as(bad)
    assert own_check_errors(bad) == [
        "file meta MediaStorageSOPInstanceUID differs from SOPInstanceUID"
    ]
    with pytest.raises(PermanentJobError, match=r"bad-meta.dcm failed our checks"):
        validate_file(bad, "auto")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:5000])
    assert own_check_errors(truncated) != []
    del ds.PerFrameFunctionalGroupsSequence[0]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    frames = tmp_path / "frames.dcm"
    ds.save_as(frames)
    assert own_check_errors(frames)[0].startswith(("NumberOfFrames", "does not parse"))


@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
def test_a_seg_of_one_frame_passes_our_checks(case, tmp_path: Path, seg_type: str) -> None:
    volume, labels = case
    one = np.zeros_like(labels)
    one[5][labels[5] == 1] = 1  # one segment on one slice: a single frame
    path = build(volume, one, SegOptions(type=seg_type), tmp_path)
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == 1
    assert own_check_errors(path) == []
