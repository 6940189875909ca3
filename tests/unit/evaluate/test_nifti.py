"""NIfTI label volumes as references: geometry, resampling, label pairing, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomnode.cli.main import main
from dicomnode.errors import EvaluationError, UsageError
from dicomnode.evaluate.geometry import grid_from_datasets
from dicomnode.evaluate.nifti import affine_of, compare_nifti_case, parse_label_map
from dicomnode.evaluate.seg_reference import compare_segs
from dicomnode.imaging.volume import volume_from_datasets
from tests.factories import ct_series, lung_phantom, write_series
from tests.unit.evaluate.test_seg_reference import write_seg


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):
    hu = lung_phantom(slices=10, size=48)
    datasets = ct_series(hu, spacing=(0.7, 0.8))  # unequal spacing: rows and columns differ
    volume = volume_from_datasets(datasets)
    lung = hu == -850.0
    cols = np.arange(hu.shape[2])[None, None, :]
    reference = np.zeros(hu.shape, np.uint8)
    reference[lung & (cols >= 24)] = 1
    reference[lung & (cols < 24)] = 2
    ours = reference.copy()
    ours[3] = 0  # a missed slice: no frame in our SEG there
    ours[5, 20:30, 30:40] = 1
    folder = tmp_path_factory.mktemp("nifti")
    write_series(datasets, folder / "images")
    grid = grid_from_datasets(datasets)
    return dict(
        folder=folder,
        reference=reference,
        grid=grid,
        ours_path=write_seg(folder / "ours" / "seg.dcm", volume, ours, "ours"),
        ref_seg=write_seg(folder / "refseg" / "seg.dcm", volume, reference, "ref"),
        series=grid.series_uid,
    )


def save(labels_zyx: np.ndarray, affine: np.ndarray | None, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels_zyx.transpose(2, 1, 0).astype(np.int16), affine), path)
    return path


def scores(results) -> dict[str, float]:
    return {
        f"{r.segment} {name}": getattr(r.scores, name)
        for r in results
        for name in ("dice", "iou", "hausdorff95_mm", "volume_ml", "reference_volume_ml")
    }


def expected(case) -> dict[str, float]:
    return scores(compare_segs(case["ours_path"], case["ref_seg"]))


def test_an_aligned_nifti_scores_like_the_reference_seg(case, tmp_path: Path) -> None:
    path = save(case["reference"], affine_of(case["grid"]), tmp_path / "ref.nii.gz")
    want = expected(case)
    with_images = compare_nifti_case(case["ours_path"], path, grid=case["grid"])
    assert scores(with_images.results) == pytest.approx(want)
    # Without the images the grid comes from our SEG's frames, extended over the
    # NIfTI's labels: the slice our SEG missed is still scored against the reference.
    from_seg = compare_nifti_case(case["ours_path"], path)
    assert scores(from_seg.results) == pytest.approx(want)
    assert from_seg.results[0].scores.dice < 0.95


def test_a_flipped_and_a_finer_nifti_are_resampled_onto_the_source(case, tmp_path: Path) -> None:
    affine = affine_of(case["grid"])
    # Slices stored in reverse order, the affine saying so.
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, case["reference"].shape[0] - 1
    flipped = save(case["reference"][::-1], affine @ flip, tmp_path / "flipped.nii")
    assert scores(compare_nifti_case(case["ours_path"], flipped).results) == pytest.approx(
        expected(case)
    )
    # Twice the in-plane resolution: each source pixel is 2 x 2 voxels, nearest neighbour
    # picks one of them.
    fine = case["reference"].repeat(2, axis=1).repeat(2, axis=2)
    half = affine.copy()
    half[:3, :2] /= 2
    half[:3, 3] -= (half[:3, 0] + half[:3, 1]) / 2  # voxel centres a quarter pixel off
    path = save(fine, half, tmp_path / "fine.nii.gz")
    assert scores(compare_nifti_case(case["ours_path"], path).results) == pytest.approx(
        expected(case)
    )


def test_label_values_pair_by_number_or_by_the_label_map(case, tmp_path: Path) -> None:
    shifted = np.where(case["reference"] > 0, case["reference"] + 6, 0)  # 7 and 8
    path = save(shifted, affine_of(case["grid"]), tmp_path / "shifted.nii.gz")
    with pytest.raises(EvaluationError, match=r"no label value \(\[7, 8\]\) is a segment"):
        compare_nifti_case(case["ours_path"], path)
    label_map = parse_label_map(['7="Left lung"', "8=right LUNG"])
    got = compare_nifti_case(case["ours_path"], path, label_map)
    assert scores(got.results) == pytest.approx(expected(case))
    only_left = compare_nifti_case(case["ours_path"], path, {7: "Left lung"})
    assert [r.segment for r in only_left.results] == ["Left lung", "all segments"]
    with pytest.raises(EvaluationError, match="names 'Heart', not a segment"):
        compare_nifti_case(case["ours_path"], path, {7: "Heart"})


def test_parse_label_map() -> None:
    assert parse_label_map(['1="Left lung"', "2=Right lung, 3='Heart'"]) == {
        1: "Left lung",
        2: "Right lung",
        3: "Heart",
    }
    for bad in ["Left lung", "x=Left", "0=Background", "1=", '1=""']:
        with pytest.raises(UsageError, match="not N=LABEL"):
            parse_label_map([bad])
    with pytest.raises(UsageError, match="mapped twice"):
        parse_label_map(["1=a", "1=b"])


def test_niftis_that_do_not_fit_are_refused(case, tmp_path: Path) -> None:
    affine = affine_of(case["grid"])
    cropped = save(case["reference"][:5], affine, tmp_path / "cropped.nii.gz")
    with pytest.raises(EvaluationError, match="does not cover the source series"):
        compare_nifti_case(case["ours_path"], cropped, grid=case["grid"])
    with pytest.raises(EvaluationError, match="does not cover the source series"):
        compare_nifti_case(case["ours_path"], cropped)  # our frames reach slice 8
    unoriented = save(case["reference"], None, tmp_path / "plain.nii.gz")
    with pytest.raises(EvaluationError, match="no orientation"):
        compare_nifti_case(case["ours_path"], unoriented)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 10, 2), np.int16), affine), four)
    with pytest.raises(EvaluationError, match="must be 3D"):
        compare_nifti_case(case["ours_path"], four)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a nifti")
    with pytest.raises(EvaluationError, match="not a readable NIfTI"):
        compare_nifti_case(case["ours_path"], junk)


def test_the_command_pairs_niftis_by_series_uid(
    case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = tmp_path / "refs"
    save(case["reference"], affine_of(case["grid"]), refs / f"{case['series']}.nii.gz")
    save(case["reference"], affine_of(case["grid"]), refs / "someone-else.nii.gz")
    ours = str(case["ours_path"].parent)
    images = str(case["folder"] / "images")
    assert main(["evaluate", ours, str(refs), "--images", images, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["reference"] == "nifti" and record["unmatched_series"] == 1
    dice = {c["segment"]: c["dice"] for c in record["cases"]}
    want = expected(case)
    assert dice == pytest.approx({k: want[f"{k} dice"] for k in dice})
    assert {a["segment"]: a["dice"] for a in record["aggregate"]} == pytest.approx(dice)
    shifted = np.where(case["reference"] > 0, case["reference"] + 6, 0)
    one = save(shifted, affine_of(case["grid"]), tmp_path / "one.nii.gz")
    argv = ["evaluate", ours, str(one), "--label-map", "7=Left lung,8=Right lung"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["SERIES", "SEGMENT", "DICE"]
    assert len(lines) == 1 + 3 + 3  # 3 rows of the case, 3 means
