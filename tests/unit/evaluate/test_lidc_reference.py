"""LIDC-IDRI-0001 (real CT, 069.xml) as the reference: detection and segmentation.

Its readers agree on one outlined nodule (all four, about 33 mm, centre near
(56.2, 86.2, -115.9) mm LPS) and mark three small ones with points only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.cli.main import main
from dicomnode.errors import EvaluationError
from dicomnode.evaluate import lidc
from dicomnode.evaluate import scores as metrics
from dicomnode.evaluate.geometry import grid_from_datasets
from dicomnode.evaluate.lidc_reference import compare_lidc_case, read_lidc, reference_nodules
from dicomnode.imaging.manifest import load_model_spec, shipped_models_path
from dicomnode.outputs import Provenance, build_segmentation
from dicomnode.pipeline import encode

LUNG = load_model_spec(shipped_models_path() / "lung-unet2d").output.segments[0]


@pytest.fixture(scope="module")
def real(real_ct: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):
    folder = real_ct("LIDC-IDRI-0001")
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    grid = grid_from_datasets(datasets)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    ordered = [by_uid[u] for u in grid.sop_uids]
    case = read_lidc(folder / "069.xml")
    (nodule,) = reference_nodules(case, grid)
    mask = lidc.nodule_mask(nodule.marks, grid.sop_uids, grid.shape)
    out = tmp_path_factory.mktemp("lidc")

    def seg(labels: np.ndarray, label: str, name: str) -> Path:
        provenance = Provenance(model_name="test", model_version="1")
        built = build_segmentation(
            ordered, labels.astype(np.uint8), [dataclasses.replace(LUNG, label=label)],
            provenance, series_uid=provenance.uid(name, "s"), sop_uid=provenance.uid(name, "i"),
            series_number=1,
        )  # fmt: skip
        path = out / name / "seg.dcm"
        path.parent.mkdir()
        path.write_bytes(encode(built))
        return path

    findings = out / "findings.json"
    far = [-50.0, 0.0, -200.0]  # nowhere near any reader's mark
    findings.write_text(
        json.dumps(
            [
                {"center": nodule.center.tolist(), "diameter_mm": 30.0, "probability": 0.9},
                {"center": far, "diameter_mm": 6.0, "probability": 0.4},
            ]
        )
    )
    return dict(
        folder=folder,
        xml=folder / "069.xml",
        grid=grid,
        case=case,
        nodule=nodule,
        mask=mask,
        perfect=seg(mask, "Nodule", "perfect"),
        lungs_only=seg(mask, "Left lung", "lungs"),
        findings=findings,
        out=out,
    )


@pytest.mark.slow
def test_the_reference_nodule(real) -> None:
    nodule = real["nodule"]
    assert nodule.readers == 4 and nodule.contoured
    np.testing.assert_allclose(nodule.center, [56.17, 86.20, -115.86], atol=0.05)
    small = reference_nodules(real["case"], real["grid"], include_small=True)
    assert len(small) == 4 and sum(n.contoured for n in small) == 1
    (strict,) = reference_nodules(real["case"], real["grid"], min_readers=4)
    np.testing.assert_array_equal(strict.center, nodule.center)


@pytest.mark.slow
def test_detection_of_one_true_and_one_false_finding(
    real, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", str(real["findings"]), str(real["xml"]), "--images", str(real["folder"])]
    assert main([*argv, "--json"]) == 0
    detection = json.loads(capsys.readouterr().out)["detection"]
    # 1 nodule, 1 scan. At >= 0.5 only the true finding counts: TP 1, FP 0, FN 0.
    assert detection["cases"][0]["nodules"] == 1 and detection["cases"][0]["findings"] == 2
    agg = detection["aggregate"]
    assert (agg["true_positives"], agg["false_positives"], agg["false_negatives"]) == (1, 0, 0)
    assert agg["sensitivity"] == agg["precision"] == agg["f1"] == agg["accuracy"] == 1.0
    # The true finding outranks the false one: AUC 1; sensitivity 1 already at 0 FP/scan,
    # so at every CPM rate, CPM 1.
    assert agg["auc"] == 1.0 and agg["cpm"] == 1.0
    assert set(detection["sensitivity_at_fp_per_scan"].values()) == {1.0}
    curve = [(p["threshold"], p["true_positives"], p["false_positives"], p["fp_per_scan"])
             for p in detection["curve"]]  # fmt: skip
    assert curve == [(0.9, 1, 0, 0.0), (0.4, 1, 1, 1.0)]
    # At >= 0.3 the false one counts too: precision 1/2, F1 2/3, accuracy 1/2.
    assert main([*argv, "--json", "--threshold", "0.3"]) == 0
    agg = json.loads(capsys.readouterr().out)["detection"]["aggregate"]
    assert agg["precision"] == 0.5 and agg["f1"] == pytest.approx(2 / 3)
    assert agg["accuracy"] == 0.5
    # With the point-marked nodules too: 1 of 4 found.
    assert main([*argv, "--json", "--include-small"]) == 0
    agg = json.loads(capsys.readouterr().out)["detection"]["aggregate"]
    assert agg["nodules"] == 4 and agg["sensitivity"] == 0.25
    # The table: one row for the scan, one for all scans, then the CPM rates.
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "SERIES", "NODULES", "FINDINGS", "TP", "FP", "FN", "SENS", "PREC", "F1", "ACC", "AUC",
        "CPM",
    ]  # fmt: skip
    assert lines[2].split() == [
        "all", "1", "scans", "1", "2", "1", "0", "0", "1.000", "1.000", "1.000", "1.000",
        "1.000", "1.000",
    ]  # fmt: skip
    assert lines[-1].endswith("FP per scan: 1.000 1.000 1.000 1.000 1.000 1.000 1.000")


@pytest.mark.slow
def test_segmentation_against_the_outlines(real, capsys: pytest.CaptureFixture[str]) -> None:
    results = compare_lidc_case(real["perfect"], real["case"], real["grid"]).results
    assert [r.segment for r in results] == ["nodule 1 (4 readers, 33 mm)", "all nodules"]
    assert all(r.scores.dice == 1.0 and r.scores.hausdorff95_mm == 0.0 for r in results)
    # Three readers agreeing: a smaller reference than the union our SEG holds.
    strict = compare_lidc_case(real["perfect"], real["case"], real["grid"], min_readers=3)
    core = lidc.nodule_mask(real["nodule"].marks, real["grid"].sop_uids, real["grid"].shape, 3)
    assert strict.results[-1].scores.dice == pytest.approx(metrics.dice(real["mask"], core))
    assert strict.results[-1].scores.dice < 0.9
    # Through the command; the folder's own images give the geometry.
    assert main(["evaluate", str(real["perfect"]), str(real["folder"]), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["reference"] == "lidc" and "detection" not in record
    assert [c["dice"] for c in record["cases"]] == [1.0, 1.0]
    assert record["aggregate"] == [pytest.approx(record["aggregate"][0])]
    assert record["aggregate"][0]["segment"] == "all nodules"


@pytest.mark.slow
def test_segmentation_problems(real, capsys: pytest.CaptureFixture[str]) -> None:
    # No nodule segment in our SEG: said so, naming what it has.
    with pytest.raises(EvaluationError, match=r"has no nodule segment \(segments: Left lung"):
        compare_lidc_case(real["lungs_only"], real["case"], real["grid"])
    got = compare_lidc_case(real["lungs_only"], real["case"], real["grid"], segment="left LUNG")
    assert got.results[-1].scores.dice == 1.0
    assert main(["evaluate", str(real["lungs_only"]), str(real["xml"])]) == 1
    err = capsys.readouterr().err.strip()
    assert "has no nodule segment" in err and "\n" not in err
    # Without --images the geometry comes from our SEG's frames, which lack the slices
    # with only point marks.
    assert main(["evaluate", str(real["perfect"]), str(real["xml"])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("annotated image(s) are not in our SEG's frames; "
                        "give the source series with --images")  # fmt: skip


@pytest.mark.slow
def test_both_tasks_with_plots(real, capsys: pytest.CaptureFixture[str]) -> None:
    plots = real["out"] / "plots"
    argv = ["evaluate", str(real["perfect"]), str(real["xml"]), "--images", str(real["folder"]),
            "--findings", str(real["findings"]), "--plots", str(plots), "--json"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["cases"][-1]["dice"] == 1.0 and record["detection"]["aggregate"]["cpm"] == 1.0
    series = real["grid"].series_uid
    sizes = {
        "roc.png": (600, 600),
        "froc.png": (700, 500),
        "dice.png": (600, 400),
        f"overlay_{series}.png": (1200, 900),  # 9 slices: 4 a row, 3 rows of 300 px
    }
    assert sorted(Path(p).name for p in record["plots"]) == sorted(sizes)
    for name, size in sizes.items():
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.size == size
