"""``dicomnode evaluate``: our SEGs and findings against references, per case and overall.

REFERENCE is a DICOM SEG, a NIfTI label volume or LIDC XML (a file, or a folder of
them); its kind decides the comparison:

* SEG: segments paired by label (:func:`dicomnode.evaluate.seg_reference.compare_segs`).
* NIfTI: label value N is our segment number N, or as ``--label-map`` says; one file
  per case, named after the source series UID or after our SEG file.
* LIDC XML: our nodule segment(s) against the readers' outlines, and, with findings
  (``--findings FILE.json``, or findings in OURS), detection metrics against the
  consensus nodules. The source geometry comes from ``--images``, from DICOM images
  beside the XML, or from our SEG's frames.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dicomnode.cli.output import print_json, print_table
from dicomnode.config import Settings
from dicomnode.errors import EvaluationError, UsageError
from dicomnode.evaluate.detection import (
    CPM_RATES,
    DetectionReport,
    Finding,
    evaluate_detection,
)
from dicomnode.evaluate.geometry import SourceGrid, grid_from_seg, grids_from_folders
from dicomnode.evaluate.lidc_reference import (
    LidcCase,
    compare_lidc_case,
    read_lidc,
    reference_nodules,
)
from dicomnode.evaluate.nifti import compare_nifti_case, is_nifti, nifti_stem, parse_label_map
from dicomnode.evaluate.progress import Progress
from dicomnode.evaluate.seg_reference import CaseMasks, SegmentComparison, compare_seg_case
from dicomnode.evaluate.sr_findings import read_findings

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
}
EXIT_USAGE = 2


def _files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def _segs_by_series(root: Path) -> dict[str, Path]:
    """Find the SEG files under ``root`` (or ``root`` itself), keyed by source series."""
    found: dict[str, Path] = {}
    for path in _files(root):
        if path.suffix.lower() in (".json", ".xml") or is_nifti(path):
            continue
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


def _parse_findings(data: Any, path: Path) -> dict[str, list[Finding]] | list[Finding]:
    def one(item: Any) -> Finding:
        try:
            center = np.asarray([float(v) for v in item["center"]], dtype=float)
            if center.shape != (3,):
                raise ValueError
            return Finding(center, float(item["diameter_mm"]), float(item["probability"]))
        except (KeyError, TypeError, ValueError):
            raise EvaluationError(
                f'{path}: a finding needs "center": [x, y, z], "diameter_mm" and "probability"'
            ) from None

    if isinstance(data, list):
        return [one(item) for item in data]
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {str(uid): [one(item) for item in items] for uid, items in data.items()}
    raise EvaluationError(
        f"{path}: findings must be a JSON list of findings or an object of series UID -> list"
    )


def _findings_for(ours_path: Path, grids: Mapping[str, SourceGrid]) -> dict[str, list[Finding]]:
    """Return the findings under ``ours_path`` by source series UID.

    The one place findings come from, so that the SR reader can be added here: a JSON
    file (a list, for the only case, under the key ""; or series UID -> list), a
    folder's JSON files, and our SR files (through :func:`read_findings`).

    Parameters
    ----------
    ours_path : Path
        A findings JSON file, an SR, or a folder holding them.

    Returns
    -------
    dict[str, list[Finding]]
        By series UID; ``""`` holds a list that named no series.
    """
    out: dict[str, list[Finding]] = {}
    for path in _files(ours_path):
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise EvaluationError(f"{path}: not readable JSON ({exc})") from None
            parsed = _parse_findings(data, path)
            if isinstance(parsed, list):
                out.setdefault("", []).extend(parsed)
            else:
                for uid, items in parsed.items():
                    out.setdefault(uid, []).extend(items)
            continue
        if is_nifti(path) or path.suffix.lower() == ".xml":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if str(ds.get("SOPClassUID", "")) not in SR_CLASSES:
            continue
        series, found = read_findings(path, grids)
        if series:
            out.setdefault(series, []).extend(found)
    return out


@dataclass
class _References:
    kind: str  # "seg", "nifti" or "lidc"
    segs: dict[str, Path] = field(default_factory=dict)
    niftis: list[Path] = field(default_factory=list)
    lidc: dict[str, LidcCase] = field(default_factory=dict)


def _references(root: Path) -> _References:
    """Find the references under ``root`` and decide their kind."""
    if root.is_file():
        if is_nifti(root):
            return _References("nifti", niftis=[root])
        if root.suffix.lower() == ".xml":
            case = read_lidc(root)  # a single file that is not LIDC is an error
            return _References("lidc", lidc={case.series_uid: case})
        return _References("seg", segs=_segs_by_series(root))
    files = _files(root)
    niftis = [p for p in files if is_nifti(p)]
    if niftis:
        return _References("nifti", niftis=niftis)
    xmls = [p for p in files if p.suffix.lower() == ".xml"]
    if xmls:
        cases: dict[str, LidcCase] = {}
        for path in xmls:
            try:
                case = read_lidc(path)
            except EvaluationError:
                continue  # other XML in the folder: skipped, as any other file
            cases[case.series_uid] = case
        if not cases:
            raise EvaluationError(f"{root}: no LIDC XML among its {len(xmls)} XML file(s)")
        return _References("lidc", lidc=cases)
    try:
        return _References("seg", segs=_segs_by_series(root))
    except LookupError:
        raise LookupError(f"no reference (DICOM SEG, NIfTI or LIDC XML) found in {root}") from None


@dataclass
class _Run:
    """What the cases produce, gathered for the table, the JSON and the plots."""

    args: argparse.Namespace
    grids: dict[str, SourceGrid]
    segmentation: list[SegmentComparison] = field(default_factory=list)
    detection: DetectionReport | None = None
    problems: list[str] = field(default_factory=list)
    unmatched: int = 0
    plots: list[Path] = field(default_factory=list)


def _check_options(args: argparse.Namespace) -> dict[int, str]:
    label_map = parse_label_map(args.label_map or [])
    if args.min_readers < 1 or args.min_readers > 4:
        raise UsageError(f"--min-readers must be 1 to 4, not {args.min_readers}")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must lie in [0, 1], not {args.threshold}")
    if args.plots:
        from dicomnode.evaluate.plots import require_matplotlib

        require_matplotlib()
    for path in [args.ours, args.reference, *(args.images or []), args.findings]:
        if path is not None and not path.exists():
            raise LookupError(f"no such file or folder: {path}")
    return label_map


def evaluate(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode evaluate OURS REFERENCE`` (see the module docstring).

    Parameters
    ----------
    settings : Settings
        Unused; the command works on files.
    args : argparse.Namespace
        The subcommand's options.

    Returns
    -------
    int
        0 when every case was compared, 1 when one or more could not be, 2 for a
        malformed option.
    """
    try:
        label_map = _check_options(args)
    except UsageError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    references = _references(args.reference)
    if references.kind != "nifti" and label_map:
        print("dicomnode: --label-map applies to NIfTI references only", file=sys.stderr)
        return EXIT_USAGE
    folders = list(args.images or [])
    if references.kind == "lidc" and args.reference.is_dir():
        folders.append(args.reference)  # LIDC folders hold the images beside the XML
    run = _Run(args, grids_from_folders(folders) if folders else {})
    if references.kind == "lidc":
        _run_lidc(run, references.lidc)
    else:
        ours = _segs_by_series(args.ours)
        if references.kind == "seg":
            pairs = _pair_segs(run, ours, references.segs)
        else:
            pairs = _pair_niftis(run, ours, references.niftis)
        progress = _progress(args, len(pairs))
        for case, our_path, reference in pairs:
            try:
                if references.kind == "seg":
                    masks = compare_seg_case(our_path, reference)
                else:
                    masks = compare_nifti_case(our_path, reference, label_map, run.grids.get(case))
                run.segmentation += masks.results
                _plot_case(run, case, masks)
            except EvaluationError as exc:
                run.problems.append(str(exc))
            progress.advance()
    if run.problems and not run.segmentation and run.detection is None:
        # Nothing was compared: the problem is the answer, one line on stderr.
        more = f" (and {len(run.problems) - 1} more)" if len(run.problems) > 1 else ""
        raise EvaluationError(run.problems[0] + more)
    _plot_summaries(run)
    _report(run, references.kind)
    return 1 if run.problems else 0


def _progress(args: argparse.Namespace, total: int) -> Progress:
    shown = args.progress or (sys.stderr.isatty() and not args.json)
    return Progress(total, shown)


def _pair_segs(
    run: _Run, ours: dict[str, Path], references: dict[str, Path]
) -> list[tuple[str, Path, Path]]:
    cases = sorted(set(ours) & set(references))
    if not cases:
        raise LookupError("no case has both our SEG and a reference SEG of the same series")
    run.unmatched = len(set(ours) ^ set(references))
    return [(c, ours[c], references[c]) for c in cases]


def _pair_niftis(
    run: _Run, ours: dict[str, Path], niftis: list[Path]
) -> list[tuple[str, Path, Path]]:
    if len(ours) == 1 and len(niftis) == 1:
        ((case, path),) = ours.items()
        return [(case, path, niftis[0])]
    by_name = {nifti_stem(p): p for p in niftis}
    pairs = []
    for case, path in sorted(ours.items()):
        nifti = by_name.get(case) or by_name.get(path.name.removesuffix(path.suffix))
        if nifti is not None:
            pairs.append((case, path, nifti))
    if not pairs:
        raise LookupError(
            "no case has both our SEG and a NIfTI reference (name each NIfTI after its "
            "series UID or after our SEG file)"
        )
    run.unmatched = len(ours) - len(pairs) + len(niftis) - len(pairs)
    return pairs


def _lidc_grid(run: _Run, case: LidcCase, ours_segs: dict[str, Path]) -> tuple[SourceGrid, str]:
    grid = run.grids.get(case.series_uid)
    if grid is not None:
        return grid, "the source images"
    if case.series_uid in ours_segs:
        seg_grid = grid_from_seg(pydicom.dcmread(ours_segs[case.series_uid]))
        if seg_grid is not None:
            return seg_grid, "our SEG's frames"
    raise EvaluationError(
        f"{case.path}: no source geometry for its series; give the source images with --images"
    )


def _run_lidc(run: _Run, cases: dict[str, LidcCase]) -> None:
    args = run.args
    try:
        ours_segs = _segs_by_series(args.ours)
    except LookupError:
        ours_segs = {}
    findings = _findings_for(args.findings or args.ours, run.grids)
    if "" in findings:
        if len(cases) != 1:
            raise EvaluationError(
                "a findings list without series UIDs needs exactly one reference case; "
                "give an object of series UID -> findings"
            )
        findings.setdefault(next(iter(cases)), []).extend(findings.pop(""))
    detect = bool(findings) or args.findings is not None
    if not ours_segs and not detect:
        raise LookupError(f"no DICOM SEG or findings found in {args.ours}")
    references: dict[str, list[Any]] = {}
    progress = _progress(args, len(cases))
    for uid, case in sorted(cases.items()):
        try:
            grid, source = _lidc_grid(run, case, ours_segs)
            if detect:
                references[uid] = reference_nodules(
                    case, grid, args.min_readers, args.include_small, source
                )
            if uid in ours_segs:
                masks = compare_lidc_case(
                    ours_segs[uid], case, grid, args.segment, args.min_readers, source
                )
                run.segmentation += masks.results
                _plot_case(run, uid, masks)
        except EvaluationError as exc:
            run.problems.append(str(exc))
        progress.advance()
    if detect and references:
        extra = sorted(set(findings) - set(references))
        run.unmatched += len(extra)
        run.detection = evaluate_detection(
            {u: f for u, f in findings.items() if u in references}, references, args.threshold
        )
    if ours_segs:
        run.unmatched += len(set(ours_segs) - set(cases))


def _images(
    masks: CaseMasks, slices: Iterable[int], grid: SourceGrid | None
) -> dict[int, np.ndarray]:
    files = masks.files or (grid.files if grid is not None else {})
    out = {}
    for k in slices:
        path = files.get(masks.sop_uids[k])
        if path is None:
            continue
        try:
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(
                ds.get("RescaleIntercept", 0)
            )
        except Exception:  # a background is a nicety; the contours still show
            continue
        out[k] = hu
    return out


def _plot_case(run: _Run, case: str, masks: CaseMasks) -> None:
    if not run.args.plots:
        return
    from dicomnode.evaluate.plots import overlay_slices, plot_overlay

    path = run.args.plots / f"overlay_{case}.png"
    chosen = overlay_slices(masks.ours, masks.reference)
    if plot_overlay(
        masks.ours,
        masks.reference,
        path,
        _images(masks, chosen, run.grids.get(case)),
        title=f"...{case[-12:]}",
    ):
        run.plots.append(path)


def _plot_summaries(run: _Run) -> None:
    if not run.args.plots:
        return
    from dicomnode.evaluate.plots import plot_dice, plot_froc, plot_roc

    rows = [r for r in run.segmentation if r.averaged]
    if rows:
        path = run.args.plots / "dice.png"
        plot_dice(
            [f"...{r.case[-8:]} {r.segment}" for r in rows], [r.scores.dice for r in rows], path
        )
        run.plots.append(path)
    report = run.detection
    if report is None:
        return
    if report.auc is not None:
        path = run.args.plots / "roc.png"
        plot_roc(report.labels, report.scores, path)
        run.plots.append(path)
    fps, sens = report.froc
    path = run.args.plots / "froc.png"
    plot_froc(fps, sens, path, CPM_RATES, [report.cpm_sensitivities[r] for r in CPM_RATES])
    run.plots.append(path)


def _fmt(value: float | None, digits: int) -> str | None:
    if value is None:
        return None
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _aggregate(rows: Sequence[SegmentComparison]) -> list[dict[str, Any]]:
    by_segment: dict[str, list[SegmentComparison]] = defaultdict(list)
    for r in rows:
        if r.averaged:
            by_segment[r.segment].append(r)
    return [
        {
            "segment": segment,
            "cases": len(items),
            "dice": _mean([r.scores.dice for r in items]),
            "iou": _mean([r.scores.iou for r in items]),
            "hausdorff95_mm": _mean([r.scores.hausdorff95_mm for r in items]),
            "volume_ml": _mean([r.scores.volume_ml for r in items]),
            "reference_volume_ml": _mean([r.scores.reference_volume_ml for r in items]),
            "volume_difference_percent": _mean([r.scores.volume_difference_percent for r in items]),
        }
        for segment, items in by_segment.items()
    ]


def _segment_record(r: SegmentComparison) -> dict[str, Any]:
    return {
        "series_uid": r.case,
        "segment": r.segment,
        "dice": r.scores.dice,
        "iou": r.scores.iou,
        "hausdorff95_mm": r.scores.hausdorff95_mm,
        "volume_ml": r.scores.volume_ml,
        "reference_volume_ml": r.scores.reference_volume_ml,
        "volume_difference_percent": r.scores.volume_difference_percent,
        "averaged": r.averaged,
    }


def _detection_record(report: DetectionReport, args: argparse.Namespace) -> dict[str, Any]:
    total = report.total
    return {
        "threshold": report.threshold,
        "min_readers": args.min_readers,
        "include_small": args.include_small,
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


def _report(run: _Run, kind: str) -> None:
    aggregate = _aggregate(run.segmentation)
    if run.args.json:
        record: dict[str, Any] = {
            "reference": kind,
            "cases": [_segment_record(r) for r in run.segmentation],
            "aggregate": aggregate,
            "problems": run.problems,
            "unmatched_series": run.unmatched,
        }
        if run.detection is not None:
            record["detection"] = _detection_record(run.detection, run.args)
        if run.plots:
            record["plots"] = [str(p) for p in run.plots]
        print_json(record)
        return
    if run.segmentation:
        rows: list[list[str | None]] = [
            [
                "..." + r.case[-12:],
                r.segment,
                f"{r.scores.dice:.4f}",
                f"{r.scores.iou:.4f}",
                _fmt(r.scores.hausdorff95_mm, 2),
                f"{r.scores.volume_ml:.2f}",
                f"{r.scores.reference_volume_ml:.2f}",
                _fmt(r.scores.volume_difference_percent, 1),
            ]
            for r in run.segmentation
        ]
        rows += [
            [
                f"mean of {a['cases']}",
                a["segment"],
                f"{a['dice']:.4f}",
                f"{a['iou']:.4f}",
                _fmt(a["hausdorff95_mm"], 2),
                f"{a['volume_ml']:.2f}",
                f"{a['reference_volume_ml']:.2f}",
                _fmt(a["volume_difference_percent"], 1),
            ]
            for a in aggregate
        ]
        print_table(
            ["SERIES", "SEGMENT", "DICE", "IOU", "HD95 MM", "VOLUME ML", "REF ML", "DIFF %"], rows
        )
    if run.detection is not None:
        if run.segmentation:
            print()
        _print_detection(run.detection)
    if run.unmatched:
        print(f"{run.unmatched} series had ours or a reference on one side only")
    for path in run.plots:
        print(f"plot: {path}")
    for problem in run.problems:
        print(f"not compared: {problem}")


def _print_detection(report: DetectionReport) -> None:
    def cells(scores: Any) -> list[str]:
        return [
            str(scores.true_positives),
            str(scores.false_positives),
            str(scores.false_negatives),
            f"{scores.sensitivity:.3f}",
            f"{scores.precision:.3f}",
            f"{scores.f1:.3f}",
        ]

    rows: list[list[str | None]] = [
        ["..." + c.case[-12:], str(c.nodules), str(c.findings), *cells(c.scores), None, None, None]
        for c in report.cases
    ]
    total = report.total
    rows.append(
        [
            f"all {len(report.cases)} scans",
            str(sum(c.nodules for c in report.cases)),
            str(len(report.scores)),
            *cells(total),
            f"{total.accuracy:.3f}",
            _fmt(report.auc, 3),
            f"{report.cpm:.3f}",
        ]
    )
    print_table(
        ["SERIES", "NODULES", "FINDINGS", "TP", "FP", "FN", "SENS", "PREC", "F1", "ACC", "AUC",
         "CPM"],
        rows,
    )  # fmt: skip
    rates = "/".join(f"{r:g}" for r in CPM_RATES)
    values = " ".join(f"{report.cpm_sensitivities[r]:.3f}" for r in CPM_RATES)
    print(f"counts at probability >= {report.threshold:g}")
    print(f"sensitivity at {rates} FP per scan: {values}")
