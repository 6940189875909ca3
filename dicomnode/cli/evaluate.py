"""``dicomnode evaluate``: our SEGs against reference SEGs, per case and segment."""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import pydicom

from dicomnode.cli.output import print_json, print_table
from dicomnode.config import Settings
from dicomnode.evaluate.seg import EvaluationError, SegmentComparison, compare_segs

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _segs_by_series(root: Path) -> dict[str, Path]:
    """Find the SEG files under ``root`` (or ``root`` itself), keyed by source series."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    found: dict[str, Path] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM: skipped, as a folder may hold anything
            continue
        if str(ds.get("SOPClassUID", "")) != SEG_CLASS or "ReferencedSeriesSequence" not in ds:
            continue
        found[str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)] = path
    if not found:
        raise LookupError(f"no DICOM SEG found in {root}")
    return found


def _fmt(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def evaluate(settings: Settings, args: argparse.Namespace) -> int:
    """Compare SEG files or folders of them (``dicomnode evaluate OURS REFERENCE``).

    Parameters
    ----------
    settings : Settings
        Unused; the command works on files.
    args : argparse.Namespace
        ``ours``, ``reference`` and ``json``.

    Returns
    -------
    int
        0 when every case was compared, 1 when one or more could not be.
    """
    ours = _segs_by_series(args.ours)
    reference = _segs_by_series(args.reference)
    cases = sorted(set(ours) & set(reference))
    if not cases:
        raise LookupError("no case has both our SEG and a reference SEG of the same series")
    results: list[SegmentComparison] = []
    problems: list[str] = []
    for i, case in enumerate(cases, 1):
        print(f"\r[{i}/{len(cases)}] comparing", end="", file=sys.stderr, flush=True)
        try:
            results += compare_segs(ours[case], reference[case])
        except EvaluationError as exc:
            problems.append(str(exc))
    print(file=sys.stderr)
    unmatched = len(set(ours) ^ set(reference))
    if args.json:
        print_json(
            {
                "cases": [
                    {
                        "series_uid": r.case,
                        "segment": r.segment,
                        "dice": r.scores.dice,
                        "iou": r.scores.iou,
                        "hausdorff95_mm": r.scores.hausdorff95_mm,
                        "volume_ml": r.scores.volume_ml,
                        "reference_volume_ml": r.scores.reference_volume_ml,
                        "volume_difference_percent": r.scores.volume_difference_percent,
                    }
                    for r in results
                ],
                "problems": problems,
                "unmatched_series": unmatched,
            }
        )
    else:
        print_table(
            ["SERIES", "SEGMENT", "DICE", "IOU", "HD95 MM", "VOLUME ML", "REF ML", "DIFF %"],
            [
                [
                    "..." + r.case[-12:],
                    r.segment,
                    f"{r.scores.dice:.4f}",
                    f"{r.scores.iou:.4f}",
                    _fmt(r.scores.hausdorff95_mm, 2),
                    f"{r.scores.volume_ml:.1f}",
                    f"{r.scores.reference_volume_ml:.1f}",
                    _fmt(r.scores.volume_difference_percent, 1),
                ]
                for r in results
            ],
        )
        by_segment: dict[str, list[float]] = defaultdict(list)
        for r in results:
            by_segment[r.segment].append(r.scores.dice)
        if len(cases) > 1:
            for segment, values in by_segment.items():
                print(f"mean Dice {segment}: {sum(values) / len(values):.4f} over {len(values)}")
        if unmatched:
            print(f"{unmatched} series had a SEG on one side only")
        for problem in problems:
            print(f"not compared: {problem}")
    return 1 if problems else 0
