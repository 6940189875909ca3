"""Enhanced multi-frame input: per-frame geometry and rescale from the functional groups."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage

from dicomnode.errors import PermanentJobError
from dicomnode.imaging import frame_order, is_enhanced
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.imaging.volumetric import why_not_volumetric
from dicomnode.inference.segment import check_input
from tests.conftest import REPO
from tests.factories import ct_series, legacy_enhanced, repaired_j2k_series

SHUFFLE = [3, 0, 5, 1, 4, 2]


def ramp(slices: int = 6, size: int = 6) -> np.ndarray:
    # Each slice holds its own index * 10 in HU, so order is visible in the values.
    return np.stack([np.full((size, size), k * 10.0 - 500, np.float32) for k in range(slices)])


def enhanced(
    hu: np.ndarray | None = None, order: list[int] | None = None, **kwargs: object
) -> Dataset:
    hu = ramp() if hu is None else hu
    return legacy_enhanced(ct_series(hu, **kwargs), frame_order=order)  # type: ignore[arg-type]


def per_frame(ds: Dataset, keyword: str) -> None:
    """Move a macro from the shared group into every frame's group (also valid DICOM)."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    item = shared[keyword].value[0]
    del shared[keyword]
    for group in ds.PerFrameFunctionalGroupsSequence:
        setattr(group, keyword, DicomSequence([copy.deepcopy(item)]))


def frame_group(ds: Dataset, number: int) -> Dataset:
    group: Dataset = ds.PerFrameFunctionalGroupsSequence[number - 1]
    return group


def test_frames_in_any_order_sort_along_the_normal() -> None:
    hu = ramp()
    ds = enhanced(hu, SHUFFLE)
    positions = [
        list(map(float, g.PlanePositionSequence[0].ImagePositionPatient))
        for g in ds.PerFrameFunctionalGroupsSequence
    ]
    vol = volume_from_datasets([ds])
    np.testing.assert_allclose(vol.pixels, hu)
    assert vol.slice_spacing == pytest.approx(2.0)
    assert vol.pixel_spacing == (0.8, 0.8)
    assert vol.is_multiframe and vol.datasets == [ds]
    # Slice k is source index SHUFFLE[k]'s position, i.e. frame SHUFFLE.index(k) + 1.
    assert vol.frames == tuple((0, SHUFFLE.index(k) + 1) for k in range(6))
    for k, (_, number) in enumerate(vol.frames):
        np.testing.assert_allclose(vol.positions[k], positions[number - 1])
        np.testing.assert_allclose(vol.to_patient(np.array([[k, 0, 0]]))[0], positions[number - 1])
        assert vol.source_of(k) == (ds, number)
    assert frame_order(ds) == [number for _, number in vol.frames]
    assert "PixelData" not in ds


def test_multiframe_volume_equals_the_single_frame_volume() -> None:
    hu = ramp(5, 8)
    series = ct_series(hu, orientation=(1, 0, 0, 0, 0.8, -0.6), slope=2.0, intercept=-1000.0)
    multi = legacy_enhanced(series, frame_order=[4, 2, 0, 1, 3])
    single = volume_from_datasets(series)
    vol = volume_from_datasets([multi])
    np.testing.assert_array_equal(vol.pixels, single.pixels)
    np.testing.assert_allclose(vol.positions, single.positions)
    np.testing.assert_allclose(vol.normal, single.normal)
    assert vol.slice_spacing == pytest.approx(single.slice_spacing)
    assert not single.is_multiframe
    assert single.frames == tuple((k, 1) for k in range(5))


def test_per_frame_rescale_and_geometry() -> None:
    hu = ramp()
    ds = enhanced(hu)
    for keyword in ("PixelValueTransformationSequence", "PlaneOrientationSequence"):
        per_frame(ds, keyword)
    # Frame 3 stores its values with another slope/intercept: the same HU must come out.
    item = frame_group(ds, 3).PixelValueTransformationSequence[0]
    frames = ds.pixel_array.copy()
    frames[2] = np.round((hu[2] + 2000.0) / 2.0).astype(frames.dtype)
    item.RescaleSlope, item.RescaleIntercept = 2.0, -2000.0
    ds.PixelData = frames.tobytes()
    np.testing.assert_allclose(volume_from_datasets([ds]).pixels, hu)


def test_missing_rescale_means_stored_values() -> None:
    # Enhanced MR need not have a Pixel Value Transformation: values are not rescaled.
    ds = enhanced(ramp(), intercept=0.0)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.Modality = "MR"
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    vol = volume_from_datasets([ds])
    np.testing.assert_allclose(vol.pixels, ramp())
    assert vol.modality == "MR"


def test_series_of_several_multiframe_instances() -> None:
    hu = ramp()
    series = ct_series(hu)
    lower = legacy_enhanced(series[:3], frame_order=[2, 0, 1])
    upper = legacy_enhanced(series[3:], frame_order=[1, 2, 0])
    vol = volume_from_datasets([upper, lower])
    np.testing.assert_allclose(vol.pixels, hu)
    assert vol.datasets == [lower, upper]
    assert vol.frames == ((0, 2), (0, 3), (0, 1), (1, 3), (1, 1), (1, 2))


def test_single_frame_enhanced_uses_its_slice_thickness() -> None:
    ds = enhanced(ramp(1))
    assert is_enhanced(ds) and int(ds.NumberOfFrames) == 1
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = 3.0
    vol = volume_from_datasets([ds])
    assert vol.shape == (1, 6, 6) and vol.slice_spacing == 3.0 and vol.frames == ((0, 1),)


def test_one_frame_enhanced_series_is_not_routed_to_volume_models() -> None:
    ds = enhanced(ramp(1))
    assert why_not_volumetric(ds, 1) == "1 slice(s)"
    assert why_not_volumetric(enhanced(ramp(3)), 1) is None


def test_enhanced_mr_routed_to_a_ct_model_is_refused() -> None:
    ds = enhanced(ramp(), intercept=0.0)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.Modality = "MR"
    spec = load_model_spec(REPO / "models/lung-unet2d")
    with pytest.raises(PermanentJobError, match="takes CT, not MR"):
        check_input(spec, volume_from_datasets([ds]))


def _set_position(number: int, position: list[float]) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        frame_group(ds, number).PlanePositionSequence[0].ImagePositionPatient = position

    return mutate


def _tilt_frames(ds: Dataset) -> None:
    for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        group.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.5 * k, 2.0 * k]


def _orient_frame_2(ds: Dataset) -> None:
    per_frame(ds, "PlaneOrientationSequence")
    frame_group(ds, 2).PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]


def _space_frame_2(ds: Dataset) -> None:
    per_frame(ds, "PixelMeasuresSequence")
    frame_group(ds, 2).PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.5]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_orient_frame_2, "mixes slice orientations"),
        (_space_frame_2, "mixes pixel spacings"),
        (_set_position(3, [-100.0, -100.0, -48.0]), "two slices at the same position"),
        (_set_position(3, [-100.0, -100.0, -45.0]), "uneven slice spacing"),
        (_tilt_frames, "tilted"),
        (
            lambda ds: delattr(frame_group(ds, 3), "PlanePositionSequence"),
            r"instance [0-9.]+ frame 3: ImagePositionPatient is missing",
        ),
        (
            lambda ds: delattr(ds.SharedFunctionalGroupsSequence[0], "PixelMeasuresSequence"),
            r"frame 1: PixelSpacing is missing",
        ),
        (
            lambda ds: setattr(ds, "NumberOfFrames", 7),
            "Per-Frame Functional Groups Sequence has 6 items for 7 frames",
        ),
        (lambda ds: delattr(ds, "PixelData"), r"instance [0-9.]+: has no pixel data"),
        (lambda ds: setattr(ds, "PixelData", b"\x00" * 10), "cannot decode pixel data"),
    ],
)
def test_bad_multiframe_input_fails_clearly(
    mutate: Callable[[Dataset], None], message: str
) -> None:
    ds = enhanced()
    mutate(ds)
    with pytest.raises(PermanentJobError, match=message):
        volume_from_datasets([ds])


def test_mixing_single_and_multiframe_orientations_is_refused() -> None:
    axial = enhanced()
    coronal = ct_series(ramp(2), orientation=(1, 0, 0, 0, 0, -1), origin=(0, 50, 0))
    with pytest.raises(PermanentJobError, match="mixes slice orientations"):
        volume_from_datasets([axial, *coronal])


def test_multiframe_without_functional_groups_is_refused() -> None:
    ds = ct_series(ramp(1))[0]
    ds.NumberOfFrames = 2
    with pytest.raises(PermanentJobError, match=r"multi-frame image without per-frame"):
        volume_from_datasets([ds])


def test_real_jpeg2000_series_as_one_enhanced_instance(data_dir: Path, tmp_path: Path) -> None:
    # Compressed frames stay encapsulated in the converted instance: decoding all
    # frames at once must give the same HU volume as the single-frame files.
    paths = repaired_j2k_series(data_dir / "ct/abdomen-ct-j2k", tmp_path / "j2k")
    single = volume_from_datasets([pydicom.dcmread(p) for p in paths])
    multi = legacy_enhanced([pydicom.dcmread(p) for p in reversed(paths)])
    assert multi.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    vol = volume_from_datasets([multi])
    np.testing.assert_array_equal(vol.pixels, single.pixels)
    np.testing.assert_allclose(vol.positions, single.positions, atol=1e-4)
    groups = multi.PerFrameFunctionalGroupsSequence
    for k, (_, number) in enumerate(vol.frames):
        source = groups[number - 1].ConversionSourceAttributesSequence[0]
        assert source.ReferencedSOPInstanceUID == single.datasets[k].SOPInstanceUID
