"""Our SEG against a reference SEG, through the library and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicomnode.cli.main import main
from dicomnode.errors import EvaluationError
from dicomnode.evaluate import scores as metrics
from dicomnode.evaluate.seg_reference import compare_segs
from dicomnode.imaging.manifest import load_model_spec, shipped_models_path
from dicomnode.imaging.volume import volume_from_datasets
from dicomnode.outputs import Provenance, build_segmentation
from dicomnode.pipeline import encode
from tests.factories import ct_series, lung_phantom

SPEC = load_model_spec(shipped_models_path() / "lung-unet2d")


def write_seg(path: Path, volume, labels: np.ndarray, tag: str) -> Path:
    provenance = Provenance(model_name=SPEC.name, model_version=SPEC.version)
    seg = build_segmentation(
        volume.datasets, labels, SPEC.output.segments, provenance,
        series_uid=provenance.uid(tag, "s"), sop_uid=provenance.uid(tag, "i"),
        series_number=1,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(seg))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):
    hu = lung_phantom(slices=10, size=48)
    volume = volume_from_datasets(ct_series(hu, spacing=(0.7, 0.7)))
    lung = hu == -850.0
    cols = np.arange(hu.shape[2])[None, None, :]
    reference = np.zeros(hu.shape, np.uint8)
    reference[lung & (cols >= 24)] = 1
    reference[lung & (cols < 24)] = 2
    ours = reference.copy()
    ours[3] = 0  # one slice missed entirely: a frame absent from our SEG
    ours[5, 20:30, 30:40] = 1  # and a false blob in the left lung's label
    folder = tmp_path_factory.mktemp("eval")
    return dict(
        volume=volume,
        ours=ours,
        reference=reference,
        ours_path=write_seg(folder / "ours" / "seg.dcm", volume, ours, "ours"),
        ref_path=write_seg(folder / "ref" / "seg.dcm", volume, reference, "ref"),
    )


def test_scores_equal_the_metrics_on_the_label_maps(case) -> None:
    results = compare_segs(case["ours_path"], case["ref_path"])
    assert [r.segment for r in results] == ["Left lung", "Right lung", "all segments"]
    vol = case["volume"]
    spacing = (vol.slice_spacing, *vol.pixel_spacing)
    for r, ours, ref in [
        (results[0], case["ours"] == 1, case["reference"] == 1),
        (results[1], case["ours"] == 2, case["reference"] == 2),
        (results[2], case["ours"] > 0, case["reference"] > 0),
    ]:
        expected = metrics.score_segmentation(ours, ref, spacing)
        assert r.scores.dice == pytest.approx(expected.dice)
        assert r.scores.iou == pytest.approx(expected.iou)
        assert r.scores.hausdorff95_mm == pytest.approx(expected.hausdorff95_mm)
        assert r.scores.volume_ml == pytest.approx(expected.volume_ml, rel=1e-6)
    assert results[0].scores.dice < 0.95  # the errors were noticed
    same = compare_segs(case["ref_path"], case["ref_path"])
    assert all(r.scores.dice == 1.0 and r.scores.hausdorff95_mm == 0.0 for r in same)


def test_the_command_prints_a_table_and_json(case, capsys: pytest.CaptureFixture[str]) -> None:
    ours_dir, ref_dir = case["ours_path"].parent, case["ref_path"].parent
    (ours_dir / "notes.txt").write_text("not DICOM: skipped")
    assert main(["evaluate", str(ours_dir), str(ref_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["SERIES", "SEGMENT", "DICE"]
    assert len(lines) == 7 and "all segments" in lines[3]
    assert [line.split()[:3] for line in lines[4:]] == [["mean", "of", "1"]] * 3
    assert main(["evaluate", str(case["ours_path"]), str(case["ref_path"]), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    dice = {c["segment"]: c["dice"] for c in record["cases"]}
    expected = compare_segs(case["ours_path"], case["ref_path"])
    assert dice == {r.segment: pytest.approx(r.scores.dice) for r in expected}
    assert record["problems"] == [] and record["unmatched_series"] == 0


def test_bad_inputs_are_one_line_errors(
    case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(empty), str(case["ref_path"])]) == 1
    assert capsys.readouterr().err.strip() == f"dicomnode: no DICOM SEG found in {empty}"
    other = volume_from_datasets(ct_series(lung_phantom(slices=4, size=48)))
    elsewhere = write_seg(tmp_path / "x" / "seg.dcm", other, np.ones((4, 48, 48), np.uint8), "x")
    assert main(["evaluate", str(elsewhere), str(case["ref_path"])]) == 1
    assert "no case has both our SEG and a reference SEG" in capsys.readouterr().err
    with pytest.raises(EvaluationError, match="segments series"):
        compare_segs(elsewhere, case["ref_path"])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"nope")
    with pytest.raises(EvaluationError, match="not a readable DICOM SEG"):
        compare_segs(junk, case["ref_path"])


def test_hd95_follows_the_body_not_the_uid_order(tmp_path: Path) -> None:
    # A block that starts one slice earlier in ours: HD95 is one slice gap, whatever
    # order the source UIDs sort in.
    hu = lung_phantom(slices=20, size=48)
    datasets = ct_series(hu, spacing=(0.7, 0.7))
    shuffled = np.random.default_rng(3).permutation(len(datasets))
    for ds, rank in zip(datasets, shuffled, strict=True):  # UIDs that sort out of body order
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.99.{rank + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    volume = volume_from_datasets(datasets)
    reference = np.zeros(hu.shape, np.uint8)
    reference[6:14, 10:30, 10:30] = 1
    ours = np.zeros_like(reference)
    ours[5:13, 10:30, 10:30] = 1
    a = write_seg(tmp_path / "a.dcm", volume, ours, "a")
    b = write_seg(tmp_path / "b.dcm", volume, reference, "b")
    left = compare_segs(a, b)[0]
    gap = volume.slice_spacing
    expected = metrics.hausdorff95(ours == 1, reference == 1, (gap, *volume.pixel_spacing))
    assert left.scores.hausdorff95_mm == pytest.approx(expected)
    assert left.scores.hausdorff95_mm == pytest.approx(gap)


def test_hd95_with_slice_positions_matches_uniform_spacing_and_keeps_gaps() -> None:
    a = np.zeros((6, 10, 10), bool)
    a[1:4, 2:8, 2:8] = True
    b = np.roll(a, 1, axis=0)
    uniform = metrics.hausdorff95(a, b, (2.0, 1.0, 1.0))
    positions = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert metrics.hausdorff95(a, b, (2.0, 1.0, 1.0), positions) == pytest.approx(uniform)
    # The same slices with a 10 mm hole between the 2nd and 3rd: distances grow with it.
    holed = [0.0, 2.0, 12.0, 14.0, 16.0, 18.0]
    assert metrics.hausdorff95(a, b, (2.0, 1.0, 1.0), holed) > uniform
