"""What ``dicomnode evaluate`` found, and its report: a JSON record and table rows.

The report is built here and printed by the CLI, so that the numbers and their
formatting stay with the evaluation while the CLI owns stdout.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.evaluate.detection import CPM_RATES, DetectionReport
from dicomnode.evaluate.scores import DetectionScores
from dicomnode.evaluate.seg_reference import SegmentComparison

Row = list[str | None]

SEGMENTATION_HEADERS = [
    "SERIES", "SEGMENT", "DICE", "IOU", "HD95 MM", "VOLUME ML", "REF ML", "DIFF %",
]  # fmt: skip
DETECTION_HEADERS = [
    "SERIES", "NODULES", "FINDINGS", "TP", "FP", "FN", "SENS", "PREC", "F1", "ACC", "AUC", "CPM",
]  # fmt: skip
# A comparison's scores, by their names in the JSON record, which are their attribute
# names on SegmentationScores; in the order of the table's columns after SEGMENT.
SCORE_FIELDS = (
    "dice", "iou", "hausdorff95_mm", "volume_ml", "reference_volume_ml",
    "volume_difference_percent",
)  # fmt: skip


@dataclass
class EvaluationReport:
    """What one evaluation compared, and what it could not.

    Attributes
    ----------
    kind : str
        The references' kind: ``"seg"``, ``"nifti"`` or ``"lidc"``.
    min_readers : int
        LIDC: nodules and outline voxels marked by at least this many readers.
    include_small : bool
        LIDC detection: nodules no reader outlined were counted too.
    segmentation : list[SegmentComparison]
        One comparison per case and segment.
    detection : DetectionReport or None
        The detection metrics, when findings were compared.
    problems : list[str]
        The cases that could not be compared, one line each.
    unmatched : int
        Series with ours or a reference on one side only.
    plots : list[Path]
        The PNG files written.
    """

    kind: str
    min_readers: int = 1
    include_small: bool = False
    segmentation: list[SegmentComparison] = field(default_factory=list)
    detection: DetectionReport | None = None
    problems: list[str] = field(default_factory=list)
    unmatched: int = 0
    plots: list[Path] = field(default_factory=list)


def _fmt(value: float | None, digits: int) -> str | None:
    if value is None:
        return None
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def aggregate(rows: Sequence[SegmentComparison]) -> list[dict[str, Any]]:
    """Average the comparisons per segment, over the cases that count.

    Parameters
    ----------
    rows : Sequence[SegmentComparison]
        The comparisons; those not ``averaged`` are left out.

    Returns
    -------
    list[dict[str, Any]]
        Per segment, in order of first appearance: the segment, the number of cases
        and the mean of each score.
    """
    by_segment: dict[str, list[SegmentComparison]] = defaultdict(list)
    for r in rows:
        if r.averaged:
            by_segment[r.segment].append(r)
    return [
        {
            "segment": segment,
            "cases": len(items),
            **{name: _mean([getattr(r.scores, name) for r in items]) for name in SCORE_FIELDS},
        }
        for segment, items in by_segment.items()
    ]


def _segment_record(r: SegmentComparison) -> dict[str, Any]:
    return {
        "series_uid": r.case,
        "segment": r.segment,
        **{name: getattr(r.scores, name) for name in SCORE_FIELDS},
        "averaged": r.averaged,
    }


def _score_cells(scores: dict[str, Any]) -> list[str | None]:
    """Format one case's scores, or one segment's means, as the table shows them."""
    return [
        f"{scores['dice']:.4f}",
        f"{scores['iou']:.4f}",
        _fmt(scores["hausdorff95_mm"], 2),
        f"{scores['volume_ml']:.2f}",
        f"{scores['reference_volume_ml']:.2f}",
        _fmt(scores["volume_difference_percent"], 1),
    ]


def _detection_record(report: DetectionReport, evaluation: EvaluationReport) -> dict[str, Any]:
    total = report.total
    return {
        "threshold": report.threshold,
        "min_readers": evaluation.min_readers,
        "include_small": evaluation.include_small,
        "cases": [
            {
                "series_uid": c.case,
                "nodules": c.nodules,
                "findings": c.findings,
                "true_positives": c.scores.true_positives,
                "false_positives": c.scores.false_positives,
                "false_negatives": c.scores.false_negatives,
                "sensitivity": c.scores.sensitivity,
                "precision": c.scores.precision,
                "f1": c.scores.f1,
            }
            for c in report.cases
        ],
        "aggregate": {
            "scans": len(report.cases),
            "nodules": sum(c.nodules for c in report.cases),
            "findings": len(report.scores),
            "true_positives": total.true_positives,
            "false_positives": total.false_positives,
            "false_negatives": total.false_negatives,
            "sensitivity": total.sensitivity,
            "precision": total.precision,
            "f1": total.f1,
            "accuracy": total.accuracy,
            "auc": report.auc,
            "cpm": report.cpm,
        },
        "sensitivity_at_fp_per_scan": {str(r): s for r, s in report.cpm_sensitivities.items()},
        "curve": [
            {
                "threshold": p.threshold,
                "true_positives": p.true_positives,
                "false_positives": p.false_positives,
                "false_negatives": p.false_negatives,
                "fp_per_scan": p.fp_per_scan,
                "sensitivity": p.sensitivity,
                "precision": p.precision,
                "f1": p.f1,
            }
            for p in report.curve
        ],
    }


def report_record(report: EvaluationReport) -> dict[str, Any]:
    """Return the report as ``dicomnode evaluate --json`` prints it.

    Parameters
    ----------
    report : EvaluationReport
        The evaluation.

    Returns
    -------
    dict[str, Any]
        The cases, their aggregate per segment, the problems and unmatched series;
        the detection metrics and the plots when there are any.
    """
    record: dict[str, Any] = {
        "reference": report.kind,
        "cases": [_segment_record(r) for r in report.segmentation],
        "aggregate": aggregate(report.segmentation),
        "problems": report.problems,
        "unmatched_series": report.unmatched,
    }
    if report.detection is not None:
        record["detection"] = _detection_record(report.detection, report)
    if report.plots:
        record["plots"] = [str(p) for p in report.plots]
    return record


def segmentation_rows(report: EvaluationReport) -> list[Row]:
    """Return the rows under :data:`SEGMENTATION_HEADERS`: each case, then the means.

    Parameters
    ----------
    report : EvaluationReport
        The evaluation.

    Returns
    -------
    list[list[str | None]]
        One row per case and segment, then one per segment averaged over its cases;
        ``None`` where a score has no value.
    """
    rows: list[Row] = []
    for r in report.segmentation:
        rows.append(["..." + r.case[-12:], r.segment, *_score_cells(_segment_record(r))])
    for a in aggregate(report.segmentation):
        rows.append([f"mean of {a['cases']}", a["segment"], *_score_cells(a)])
    return rows


def _counts(scores: DetectionScores) -> list[str | None]:
    return [
        str(scores.true_positives),
        str(scores.false_positives),
        str(scores.false_negatives),
        f"{scores.sensitivity:.3f}",
        f"{scores.precision:.3f}",
        f"{scores.f1:.3f}",
    ]


def detection_rows(report: DetectionReport) -> list[Row]:
    """Return the rows under :data:`DETECTION_HEADERS`: each scan, then all of them.

    Parameters
    ----------
    report : DetectionReport
        The detection metrics.

    Returns
    -------
    list[list[str | None]]
        One row per scan (no accuracy, AUC or CPM: they are over all scans), then
        the total.
    """
    rows: list[Row] = [
        ["..." + c.case[-12:], str(c.nodules), str(c.findings), *_counts(c.scores), None, None,
         None]
        for c in report.cases
    ]  # fmt: skip
    total = report.total
    rows.append(
        [
            f"all {len(report.cases)} scans",
            str(sum(c.nodules for c in report.cases)),
            str(len(report.scores)),
            *_counts(total),
            f"{total.accuracy:.3f}",
            _fmt(report.auc, 3),
            f"{report.cpm:.3f}",
        ]
    )
    return rows


def detection_notes(report: DetectionReport) -> list[str]:
    """Return the lines under the detection table: its threshold and the FROC points.

    Parameters
    ----------
    report : DetectionReport
        The detection metrics.

    Returns
    -------
    list[str]
        Two lines.
    """
    rates = "/".join(f"{r:g}" for r in CPM_RATES)
    values = " ".join(f"{report.cpm_sensitivities[r]:.3f}" for r in CPM_RATES)
    return [
        f"counts at probability >= {report.threshold:g}",
        f"sensitivity at {rates} FP per scan: {values}",
    ]


def closing_notes(report: EvaluationReport) -> list[str]:
    """Return the lines after the tables: unmatched series, plots, cases not compared.

    Parameters
    ----------
    report : EvaluationReport
        The evaluation.

    Returns
    -------
    list[str]
        The lines, possibly none.
    """
    lines = []
    if report.unmatched:
        lines.append(f"{report.unmatched} series had ours or a reference on one side only")
    lines += [f"plot: {path}" for path in report.plots]
    lines += [f"not compared: {problem}" for problem in report.problems]
    return lines
