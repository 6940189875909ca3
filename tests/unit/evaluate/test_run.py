"""One evaluation through the library: finding inputs, pairing cases, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.errors import EvaluationError, UsageError
from dicomnode.evaluate import (
    DETECTION_HEADERS,
    SEGMENTATION_HEADERS,
    EvaluationOptions,
    EvaluationReport,
    closing_notes,
    evaluate_folders,
    report_record,
    segmentation_rows,
)
from dicomnode.evaluate.inputs import (
    find_references,
    findings_for,
    findings_in,
    scan_ours,
    segs_by_series,
)
from dicomnode.evaluate.report import aggregate
from dicomnode.evaluate.scores import SegmentationScores
from dicomnode.evaluate.seg_reference import SegmentComparison
from dicomnode.imaging.volume import volume_from_datasets
from tests.factories import ct_series, lung_phantom
from tests.unit.evaluate.test_seg_reference import write_seg


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    hu = lung_phantom(slices=6, size=32)
    volume = volume_from_datasets(ct_series(hu))
    labels = (hu == -850.0).astype(np.uint8)
    folder = tmp_path_factory.mktemp("run")
    seg = write_seg(folder / "ours" / "seg.dcm", volume, labels, "o")
    (folder / "ours" / "notes.txt").write_text("not DICOM: skipped")
    return dict(folder=folder, seg=seg, series=str(volume.datasets[0].SeriesInstanceUID))


def test_inputs_are_found_by_content(case: dict[str, Any], tmp_path: Path) -> None:
    ours = case["seg"].parent
    assert segs_by_series(ours) == {case["series"]: case["seg"]}
    references = find_references(ours)
    assert references.kind == "seg" and references.segs == {case["series"]: case["seg"]}
    assert findings_for(ours, {}) == {}  # a SEG and a text file hold no findings
    (tmp_path / "notes.txt").write_text("nothing to compare with")
    with pytest.raises(LookupError, match="no reference"):
        find_references(tmp_path)
    with pytest.raises(LookupError, match="no DICOM SEG found"):
        segs_by_series(tmp_path)


def test_one_walk_finds_our_segs_and_findings_files(case: dict[str, Any], tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "seg.dcm").write_bytes(case["seg"].read_bytes())
    finding = {"center": [1.0, 2.0, 3.0], "diameter_mm": 6.0, "probability": 0.7}
    (ours / "a.json").write_text(json.dumps([finding]))
    (ours / "b.json").write_text(json.dumps({"1.2.3": [finding, finding]}))
    (ours / "read.xml").write_text("<x/>")
    (ours / "notes.txt").write_text("not DICOM")
    scanned = scan_ours(ours)
    assert scanned.segs == {case["series"]: ours / "seg.dcm"}
    assert scanned.findings == [ours / "a.json", ours / "b.json"]
    found = findings_in(scanned.findings, {})
    assert {uid: len(items) for uid, items in found.items()} == {"": 1, "1.2.3": 2}
    assert found[""][0].probability == 0.7
    assert found[""][0].center.tolist() == [1.0, 2.0, 3.0]
    again = findings_for(ours, {})  # the same, walking the folder itself
    assert {uid: [f.probability for f in items] for uid, items in again.items()} == {
        "": [0.7],
        "1.2.3": [0.7, 0.7],
    }


def test_a_seg_against_itself(case: dict[str, Any]) -> None:
    report = evaluate_folders(case["seg"].parent, case["seg"], EvaluationOptions())
    assert report.kind == "seg" and report.problems == [] and report.unmatched == 0
    assert report.detection is None and report.plots == []
    assert [r.segment for r in report.segmentation] == ["Left lung", "Right lung", "all segments"]
    assert all(r.case == case["series"] and r.scores.dice == 1.0 for r in report.segmentation)

    record = report_record(report)
    assert record["reference"] == "seg" and len(record["cases"]) == 3
    assert [a["segment"] for a in record["aggregate"]] == [r.segment for r in report.segmentation]
    assert "detection" not in record and "plots" not in record

    rows = segmentation_rows(report)
    assert len(rows) == 6  # three cases, then three means
    assert all(len(row) == len(SEGMENTATION_HEADERS) for row in rows)
    assert rows[0][:3] == ["..." + case["series"][-12:], "Left lung", "1.0000"]
    assert rows[3][0] == "mean of 1"
    assert closing_notes(report) == []
    assert len(DETECTION_HEADERS) == 12


def test_closing_notes_name_what_was_not_compared(case: dict[str, Any]) -> None:
    report = evaluate_folders(case["seg"], case["seg"], EvaluationOptions())
    report.unmatched = 2
    report.problems.append("x.dcm: unreadable")
    assert closing_notes(report) == [
        "2 series had ours or a reference on one side only",
        "not compared: x.dcm: unreadable",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EvaluationOptions(min_readers=0), "--min-readers must be 1 to 4, not 0"),
        (EvaluationOptions(threshold=1.5), r"--threshold must lie in \[0, 1\], not 1.5"),
        (EvaluationOptions(label_map=("one=Left lung",)), "is not N=LABEL"),
        (EvaluationOptions(label_map=("1=Left lung",)), "applies to NIfTI references only"),
    ],
)
def test_malformed_options_are_usage_errors(
    case: dict[str, Any], options: EvaluationOptions, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        evaluate_folders(case["seg"], case["seg"], options)


def test_missing_inputs_are_lookup_errors(case: dict[str, Any], tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    for ours, reference, options in [
        (gone, case["seg"], EvaluationOptions()),
        (case["seg"], gone, EvaluationOptions()),
        (case["seg"], case["seg"], EvaluationOptions(images=(gone,))),
        (case["seg"], case["seg"], EvaluationOptions(findings=gone)),
    ]:
        with pytest.raises(LookupError, match=f"no such file or folder: {gone}"):
            evaluate_folders(ours, reference, options)


def test_nothing_compared_is_an_error(case: dict[str, Any], tmp_path: Path) -> None:
    other = volume_from_datasets(ct_series(lung_phantom(slices=4, size=32)))
    elsewhere = write_seg(tmp_path / "x" / "seg.dcm", other, np.ones((4, 32, 32), np.uint8), "x")
    with pytest.raises(LookupError, match="no case has both our SEG and a reference SEG"):
        evaluate_folders(elsewhere, case["seg"], EvaluationOptions())
    xml = tmp_path / "other.xml"
    xml.write_text("<?xml version='1.0'?><Annotations><box/></Annotations>")
    with pytest.raises(EvaluationError, match="not an LIDC read message"):
        evaluate_folders(case["seg"], xml, EvaluationOptions())


def test_the_aggregate_averages_each_segment_over_its_averaged_cases() -> None:
    def row(case: str, segment: str, dice: float, averaged: bool = True) -> SegmentComparison:
        scores = SegmentationScores(dice, dice, math.inf, 2.0, 1.0)
        return SegmentComparison(case, segment, scores, averaged)

    rows = [
        row("1.1", "nodule", 0.5),
        row("1.2", "nodule", 1.0),
        row("1.2", "nodule 2", 0.0, averaged=False),  # a detail row: not in the means
    ]
    (mean,) = aggregate(rows)
    assert mean["segment"] == "nodule" and mean["cases"] == 2
    assert mean["dice"] == 0.75 and math.isinf(mean["hausdorff95_mm"])
    assert mean["volume_difference_percent"] == 100.0
    assert aggregate([]) == []
    report = EvaluationReport("lidc", segmentation=rows)
    table = segmentation_rows(report)
    assert table[0][4] == "inf" and table[-1][:3] == ["mean of 2", "nodule", "0.7500"]
