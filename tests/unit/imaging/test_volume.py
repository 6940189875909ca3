from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from dicomnode.errors import PermanentJobError
from dicomnode.imaging import load_series
from dicomnode.imaging.volume import volume_from_datasets
from tests.factories import ct_series, write_series


def ramp(slices: int = 5, size: int = 6) -> np.ndarray:
    # Each slice holds its own index * 10 in HU, so order is visible in the values.
    return np.stack([np.full((size, size), k * 10.0 - 500, np.float32) for k in range(slices)])


def test_sorts_along_the_normal_whatever_the_file_order() -> None:
    hu = ramp()
    datasets = ct_series(hu)
    random.Random(3).shuffle(datasets)
    vol = volume_from_datasets(datasets)
    np.testing.assert_allclose(vol.pixels, hu)
    assert vol.slice_spacing == pytest.approx(2.0)
    assert [int(d.InstanceNumber) for d in vol.datasets] == [1, 2, 3, 4, 5]


def test_sorting_ignores_instance_numbers() -> None:
    hu = ramp()
    datasets = ct_series(hu)
    for ds, number in zip(datasets, [5, 1, 4, 2, 3], strict=True):
        ds.InstanceNumber = number
    vol = volume_from_datasets(datasets[::-1])
    np.testing.assert_allclose(vol.pixels, hu)


def test_feet_first_stack_sorts_by_position_along_normal() -> None:
    # Positions decreasing in z: sorting must follow position, not file order.
    hu = ramp()
    datasets = ct_series(hu, positions=lambda k: (0.0, 0.0, 100.0 - 2.0 * k))
    vol = volume_from_datasets(datasets)
    np.testing.assert_allclose(vol.pixels, hu[::-1])
    assert np.all(np.diff(vol.positions[:, 2]) > 0)


def test_rescale_to_hounsfield_units() -> None:
    hu = ramp()
    vol = volume_from_datasets(ct_series(hu, slope=2.0, intercept=-1000.0))
    np.testing.assert_allclose(vol.pixels, hu)
    assert vol.pixels.dtype == np.float32


def test_pixel_data_is_released_after_loading() -> None:
    vol = volume_from_datasets(ct_series(ramp()))
    assert all("PixelData" not in d for d in vol.datasets)


def test_voxel_volume_and_patient_coordinates() -> None:
    datasets = ct_series(ramp(), spacing=(0.5, 0.8), slice_spacing=2.0, origin=(-10, -20, -30))
    vol = volume_from_datasets(datasets)
    assert vol.voxel_volume_ml == pytest.approx(0.5 * 0.8 * 2.0 / 1000)
    # (slice, row, column) -> x grows with column (0.8 mm), y with row (0.5 mm).
    point = vol.to_patient(np.array([[2, 3, 4]]))[0]
    np.testing.assert_allclose(point, [-10 + 4 * 0.8, -20 + 3 * 0.5, -30 + 2 * 2.0])


@settings(max_examples=40, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-180, 180, allow_nan=False)] * 3),
    seed=st.integers(0, 2**16),
)
def test_any_orientation_round_trips_to_source_positions(angles: tuple, seed: int) -> None:
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    orientation = tuple(rot[:, 0]) + tuple(rot[:, 1])
    hu = ramp(4, 3)
    datasets = ct_series(hu, orientation=orientation, slice_spacing=1.5, origin=(5, -7, 11))
    expected = {d.SOPInstanceUID: np.array(d.ImagePositionPatient, float) for d in datasets}
    random.Random(seed).shuffle(datasets)
    vol = volume_from_datasets(datasets)
    np.testing.assert_allclose(vol.pixels, hu, atol=1e-4)
    for k, ds in enumerate(vol.datasets):
        # Voxel (k, 0, 0) is exactly the source slice's ImagePositionPatient.
        np.testing.assert_allclose(
            vol.to_patient(np.array([[k, 0, 0]]))[0], expected[ds.SOPInstanceUID], atol=1e-3
        )


def test_single_slice_uses_slice_thickness() -> None:
    vol = volume_from_datasets(ct_series(ramp(1)))
    assert vol.shape == (1, 6, 6) and vol.slice_spacing == 1.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: setattr(d[1], "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
            "mixes slice orientations",
        ),
        (
            lambda d: setattr(d[2], "ImagePositionPatient", d[1].ImagePositionPatient),
            "two slices at the same position",
        ),
        (
            lambda d: setattr(d[2], "ImagePositionPatient", [-100, -100, -40]),
            "uneven slice spacing",
        ),
        (lambda d: delattr(d[0], "ImagePositionPatient"), "ImagePositionPatient is missing"),
        (lambda d: setattr(d[0], "PixelSpacing", [0.5, 0.5]), "mixes pixel spacings"),
        (lambda d: setattr(d[0], "NumberOfFrames", 2), "multi-frame"),
        (lambda d: setattr(d[0], "PixelData", b"\x00" * 10), "cannot decode pixel data"),
    ],
)
def test_bad_series_fail_clearly(mutate, message: str) -> None:
    datasets = ct_series(ramp())
    mutate(datasets)
    with pytest.raises(PermanentJobError, match=message):
        volume_from_datasets(datasets)


def test_empty_series() -> None:
    with pytest.raises(PermanentJobError, match="no instances"):
        volume_from_datasets([])


def test_gantry_tilt_is_refused() -> None:
    datasets = ct_series(ramp(), positions=lambda k: (0.0, 0.5 * k, 2.0 * k))
    with pytest.raises(PermanentJobError, match="tilted"):
        volume_from_datasets(datasets)


def test_load_from_files_and_unreadable_file(tmp_path: Path) -> None:
    paths = write_series(ct_series(ramp()), tmp_path / "s")
    assert load_series(paths).shape == (5, 6, 6)
    (tmp_path / "s" / "0002.dcm").write_bytes(b"garbage")
    with pytest.raises(PermanentJobError, match=r"cannot read 0002\.dcm"):
        load_series(paths)


def test_real_jpeg2000_series_decodes_to_hu(data_dir: Path) -> None:
    paths = sorted((data_dir / "ct/abdomen-ct-j2k").glob("CT.*"))
    assert len(paths) == 20
    vol = load_series(paths)
    assert vol.shape == (20, 512, 512)
    assert vol.pixels.min() >= -1100 and vol.pixels.max() <= 4000
    # Air outside the body and soft tissue inside: the rescale was applied.
    assert vol.pixels[:, :5, :5].mean() < -900
    assert -200 < np.median(vol.pixels[:, 200:300, 200:300]) < 200
    assert vol.slice_spacing == pytest.approx(2.0, abs=0.05)
    # These files carry their SOP class only in the file meta; outputs need it.
    assert all(d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for d in vol.datasets)


def test_shipped_demo_sample_loads(tmp_path: Path) -> None:
    from tests.conftest import REPO

    paths = sorted((REPO / "samples/lidc-idri-0001-lungs").glob("*.dcm"))
    assert len(paths) == 52
    assert sum(p.stat().st_size for p in paths) < 10 * 1024 * 1024
    vol = load_series(paths)  # JPEG-LS lossless, decoded by pylibjpeg-libjpeg
    assert vol.shape == (52, 512, 512)
    assert vol.slice_spacing == pytest.approx(2.5)
    assert vol.datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert (vol.pixels < -900).mean() > 0.2  # lungs and air


def test_missing_pixel_data_names_the_instance() -> None:
    # A header-only instance (e.g. stored without pixels by a misconfigured sender)
    # must fail the job with its UID, not with pydicom's AttributeError.
    datasets = ct_series(ramp())
    del datasets[2].PixelData
    uid = datasets[2].SOPInstanceUID
    with pytest.raises(PermanentJobError, match=rf"^instance {uid}: has no pixel data$"):
        volume_from_datasets(datasets)


def test_undecodable_pixels_without_file_meta_fail_clearly() -> None:
    datasets = ct_series(ramp())
    del datasets[1].file_meta
    datasets[1].PixelData = b"\x00" * 10
    uid = datasets[1].SOPInstanceUID
    with pytest.raises(
        PermanentJobError,
        match=rf"^instance {uid}: cannot decode pixel data \(transfer syntax unknown\)",
    ):
        volume_from_datasets(datasets)


def test_mixed_orientation_message_for_a_coronal_slice_among_axial() -> None:
    datasets = ct_series(ramp())
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(PermanentJobError, match=r"^series mixes slice orientations$"):
        volume_from_datasets(datasets)


def test_each_slice_maps_to_its_own_instance() -> None:
    datasets = ct_series(ramp())
    random.Random(5).shuffle(datasets)
    vol = volume_from_datasets(datasets)
    assert not vol.is_multiframe
    assert vol.frames == tuple((k, 1) for k in range(5))
    assert [vol.source_of(k)[0] for k in range(5)] == vol.datasets
