"""Properties of series -> volume -> SEG for random geometry, instance order and masks.

Each example builds a small synthetic series (single-frame CT images, or the same
slices converted into one enhanced multi-frame image with scrambled frames) and
checks what must hold whatever the geometry: slices sorted along the normal, voxel
indices mapped onto the source positions, pixels taken from the right source, and a
mask written as SEG read back unchanged on the right source images and frames.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from scipy.spatial.transform import Rotation

from dicomnode.imaging import Volume
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.outputs import Provenance, build_segmentation
from tests.conftest import REPO
from tests.factories import ct_series, legacy_enhanced

SPEC = load_model_spec(REPO / "models/lung-unet2d")  # two segments: labels 0..2
PROVENANCE = Provenance(model_name=SPEC.name, model_version=SPEC.version)
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# (row direction, column direction) of the planes scanners use, both ways round.
CANONICAL = [
    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # axial
    (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # coronal
    (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),  # sagittal
    (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # axial, feet first prone-like flip
    (0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # sagittal, flipped
]


def _oblique(quaternion: tuple[float, float, float, float]) -> tuple[float, ...]:
    matrix = Rotation.from_quat(quaternion).as_matrix()
    return tuple(float(v) for v in (*matrix[:, 0], *matrix[:, 1]))


_quaternions = st.tuples(*[st.floats(-1, 1, allow_nan=False)] * 4).filter(
    lambda q: float(np.linalg.norm(q)) > 0.1
)
orientations = st.one_of(st.sampled_from(CANONICAL), _quaternions.map(_oblique))


@dataclass
class Case:
    """A synthetic series and what the volume built from it must show."""

    volume: Volume
    stored: dict[tuple[str, int], np.ndarray]  # (SOP Instance UID, frame) -> HU
    positions: dict[tuple[str, int], np.ndarray]  # (SOP Instance UID, frame) -> IPP
    row_spacing: float
    column_spacing: float
    gap: float


def _frame_keys(ds: Dataset) -> list[tuple[str, int]]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return [(str(ds.SOPInstanceUID), n) for n in range(1, frames + 1)]


def _positions_of(ds: Dataset) -> list[np.ndarray]:
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [
            np.array(g.PlanePositionSequence[0].ImagePositionPatient, float)
            for g in ds.PerFrameFunctionalGroupsSequence
        ]
    return [np.array(ds.ImagePositionPatient, float)]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    orientation = draw(orientations)
    slices = draw(st.integers(2, 12))
    # At least 8 pixels a frame: highdicom 0.28 mis-packs BINARY frames of fewer
    # (found by this test; no real image is that small).
    rows, columns = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    row_spacing = draw(st.sampled_from([0.35, 0.5, 0.7, 0.976562, 1.0, 1.5]))
    column_spacing = draw(st.sampled_from([0.35, 0.5, 0.7, 0.976562, 1.0, 1.5]))
    gap = draw(st.sampled_from([0.5, 0.625, 1.0, 1.25, 2.5, 5.0]))
    origin = draw(st.tuples(*[st.floats(-300, 300, allow_nan=False)] * 3))
    multiframe = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 3000, size=(slices, rows, columns)).astype(np.float32)
    datasets = ct_series(
        hu,
        orientation=orientation,
        spacing=(row_spacing, column_spacing),
        slice_spacing=gap,
        origin=origin,
    )
    order = list(range(slices))
    random.Random(seed).shuffle(order)
    if multiframe:
        # One instance, its frames in a scrambled order: frame n is slice order[n - 1].
        inputs = [legacy_enhanced(datasets, frame_order=order)]
    else:
        inputs = [datasets[i] for i in order]  # instances in a scrambled order
    keys = [key for ds in inputs for key in _frame_keys(ds)]
    source_of = order  # both ways, the i-th frame found is slice order[i]
    stored = {key: hu[k] for key, k in zip(keys, source_of, strict=True)}
    positions = {
        key: pos
        for key, pos in zip(keys, [p for ds in inputs for p in _positions_of(ds)], strict=True)
    }
    return Case(
        volume=volume_from_datasets(inputs),
        stored=stored,
        positions=positions,
        row_spacing=row_spacing,
        column_spacing=column_spacing,
        gap=gap,
    )


def _key(volume: Volume, k: int) -> tuple[str, int]:
    ds, number = volume.source_of(k)
    return str(ds.SOPInstanceUID), number


@PROPERTY_SETTINGS
@given(case=cases())
def test_volume_is_sorted_mapped_and_filled_from_the_right_sources(case: Case) -> None:
    volume = case.volume
    slices, rows, columns = volume.shape
    assert len(volume.frames) == slices == len(case.stored)
    assert len({_key(volume, k) for k in range(slices)}) == slices  # every frame once

    # Sorted along the normal, one gap apart.
    along = volume.positions @ volume.normal
    np.testing.assert_allclose(np.diff(along), case.gap, rtol=1e-4)
    assert abs(volume.slice_spacing - case.gap) < 1e-4

    k, i, j = np.meshgrid(np.arange(slices), [0, rows - 1], [0, columns - 1], indexing="ij")
    indices = np.stack([k.ravel(), i.ravel(), j.ravel()], axis=1)
    points = volume.to_patient(indices)
    for (kk, ii, jj), point in zip(indices, points, strict=True):
        key = _key(volume, int(kk))
        # Voxel (k, i, j): the source's IPP, i rows down the column, j columns along the row.
        expected = (
            case.positions[key]
            + ii * case.row_spacing * volume.column_direction
            + jj * case.column_spacing * volume.row_direction
        )
        np.testing.assert_allclose(point, expected, atol=1e-3)
        np.testing.assert_allclose(volume.positions[kk], case.positions[key], atol=1e-4)

    for kk in range(slices):
        np.testing.assert_array_equal(volume.pixels[kk], case.stored[_key(volume, kk)])


@PROPERTY_SETTINGS
@given(case=cases(), mask_seed=st.integers(0, 2**32 - 1), fill=st.floats(0.0, 1.0))
def test_mask_round_trips_through_seg_onto_the_source_frames(
    case: Case, mask_seed: int, fill: float
) -> None:
    volume = case.volume
    rng = np.random.default_rng(mask_seed)
    labels = rng.integers(1, 3, size=volume.shape).astype(np.uint8)
    labels[rng.random(volume.shape) >= fill] = 0

    seg_object = build_segmentation(
        volume.datasets,
        labels,
        SPEC.output.segments,
        PROVENANCE,
        series_uid=PROVENANCE.uid(str(mask_seed), "seg"),
        sop_uid=PROVENANCE.uid(str(mask_seed), "seg", "i"),
        series_number=9901,
        frames=volume.frames if mask_seed % 2 else None,  # given or derived: same SEG
    )
    buffer = BytesIO()
    seg_object.save_as(buffer, enforce_file_format=True)
    seg = hd.seg.segread(BytesIO(buffer.getvalue()))

    if volume.is_multiframe:
        source = volume.datasets[0]
        got = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source.SOPInstanceUID,
            source_frame_numbers=[number for _, number in volume.frames],
            combine_segments=True,
            skip_overlap_checks=True,
            # Empty frames are left out of the SEG; beyond its last referenced frame
            # highdicom wants to be told that absent means empty.
            assert_missing_frames_are_empty=True,
        )
    else:
        got = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[d.SOPInstanceUID for d in volume.datasets],
            combine_segments=True,
            skip_overlap_checks=True,
        )
    np.testing.assert_array_equal(got, labels)

    # Every SEG frame lies exactly on the source image (frame) it references.
    for frame in pydicom.dcmread(BytesIO(buffer.getvalue())).PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        key = (str(ref.ReferencedSOPInstanceUID), int(ref.get("ReferencedFrameNumber", 1)))
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(position, case.positions[key], atol=1e-3)
