"""One evaluation: our SEGs and findings against references, per case and overall.

The reference's kind decides the comparison:

* SEG: segments paired by label (:func:`dicomnode.evaluate.seg_reference.compare_segs`).
* NIfTI: label value N is our segment number N, or as the label map says; one file
  per case, named after the source series UID or after our SEG file.
* LIDC XML: our nodule segment(s) against the readers' outlines, and, with findings
  (a findings file, or findings among ours), detection metrics against the consensus
  nodules. The source geometry comes from the source images given, from DICOM images
  beside the XML, or from our SEG's frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from dicomnode.errors import EvaluationError, UsageError
from dicomnode.evaluate.detection import evaluate_detection
from dicomnode.evaluate.figures import plot_case, plot_summaries
from dicomnode.evaluate.geometry import SourceGrid, grid_from_seg, grids_from_folders
from dicomnode.evaluate.inputs import (
    find_references,
    findings_for,
    findings_in,
    scan_ours,
    segs_by_series,
)
from dicomnode.evaluate.lidc_reference import LidcCase, compare_lidc_case, reference_nodules
from dicomnode.evaluate.nifti import compare_nifti_case, nifti_stem, parse_label_map
from dicomnode.evaluate.progress import Progress
from dicomnode.evaluate.report import EvaluationReport
from dicomnode.evaluate.seg_reference import CaseMasks, compare_seg_case


@dataclass(frozen=True)
class EvaluationOptions:
    """How to compare, as ``dicomnode evaluate``'s options say.

    Attributes
    ----------
    images : Sequence[Path]
        Source series folders: LIDC and NIfTI geometry, plot backgrounds.
    findings : Path or None
        LIDC detection: a findings JSON file, instead of the findings among ours.
    label_map : Sequence[str]
        NIfTI: ``N="LABEL"`` items (:func:`~dicomnode.evaluate.nifti.parse_label_map`).
    segment : str or None
        LIDC: our segment to compare (default: any nodule segment).
    min_readers : int
        LIDC: nodules and outline voxels marked by at least this many readers, 1 to 4.
    include_small : bool
        LIDC detection: also the nodules no reader outlined.
    threshold : float
        Detection: findings with a probability at least this count, in [0, 1].
    plots : Path or None
        A folder to write PNG plots into.
    progress : bool
        Show a progress bar over the cases on stderr.
    """

    images: Sequence[Path] = ()
    findings: Path | None = None
    label_map: Sequence[str] = ()
    segment: str | None = None
    min_readers: int = 1
    include_small: bool = False
    threshold: float = 0.5
    plots: Path | None = None
    progress: bool = False


@dataclass
class _Run:
    """One evaluation under way: its options, source geometry and report so far."""

    options: EvaluationOptions
    report: EvaluationReport
    grids: dict[str, SourceGrid] = field(default_factory=dict)

    def add_case(self, case: str, masks: CaseMasks) -> None:
        """Keep one case's comparisons, and draw them when plots are asked for."""
        self.report.segmentation += masks.results
        if self.options.plots:
            path = plot_case(self.options.plots, case, masks, self.grids.get(case))
            if path is not None:
                self.report.plots.append(path)


def _check_options(ours: Path, reference: Path, options: EvaluationOptions) -> dict[int, str]:
    label_map = parse_label_map(list(options.label_map))
    if options.min_readers < 1 or options.min_readers > 4:
        raise UsageError(f"--min-readers must be 1 to 4, not {options.min_readers}")
    if not 0.0 <= options.threshold <= 1.0:
        raise UsageError(f"--threshold must lie in [0, 1], not {options.threshold}")
    if options.plots:
        from dicomnode.evaluate.plots import require_matplotlib

        require_matplotlib()
    for path in [ours, reference, *options.images, options.findings]:
        if path is not None and not path.exists():
            raise LookupError(f"no such file or folder: {path}")
    return label_map


def evaluate_folders(ours: Path, reference: Path, options: EvaluationOptions) -> EvaluationReport:
    """Compare ours with the references, case by case (see the module docstring).

    Parameters
    ----------
    ours : Path
        Our SEG or findings file, or a folder of them.
    reference : Path
        A reference SEG, NIfTI or LIDC XML file, or a folder of them.
    options : EvaluationOptions
        How to compare.

    Returns
    -------
    EvaluationReport
        The comparisons; the cases that could not be compared are among its problems.

    Raises
    ------
    UsageError
        If an option is malformed, or a label map is given for references other
        than NIfTI.
    LookupError
        If a file or folder is missing, or holds nothing to compare.
    EvaluationError
        If no case at all could be compared, or an input cannot be read.
    """
    label_map = _check_options(ours, reference, options)
    references = find_references(reference)
    if references.kind != "nifti" and label_map:
        raise UsageError("--label-map applies to NIfTI references only")
    folders = list(options.images)
    if references.kind == "lidc" and reference.is_dir():
        folders.append(reference)  # LIDC folders hold the images beside the XML
    run = _Run(
        options,
        EvaluationReport(references.kind, options.min_readers, options.include_small),
        grids_from_folders(folders) if folders else {},
    )
    report = run.report
    if references.kind == "lidc":
        _run_lidc(run, ours, references.lidc)
    else:
        our_segs = segs_by_series(ours)
        if references.kind == "seg":
            pairs = _pair_segs(report, our_segs, references.segs)
        else:
            pairs = _pair_niftis(report, our_segs, references.niftis)
        progress = Progress(len(pairs), options.progress)
        for case, our_path, reference_path in pairs:
            try:
                if references.kind == "seg":
                    masks = compare_seg_case(our_path, reference_path)
                else:
                    masks = compare_nifti_case(
                        our_path, reference_path, label_map, run.grids.get(case)
                    )
                run.add_case(case, masks)
            except EvaluationError as exc:
                report.problems.append(str(exc))
            progress.advance()
    if report.problems and not report.segmentation and report.detection is None:
        # Nothing was compared: the problem is the answer, one line on stderr.
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise EvaluationError(report.problems[0] + more)
    if options.plots:
        report.plots += plot_summaries(options.plots, report.segmentation, report.detection)
    return report


def _pair_segs(
    report: EvaluationReport, ours: dict[str, Path], references: dict[str, Path]
) -> list[tuple[str, Path, Path]]:
    cases = sorted(set(ours) & set(references))
    if not cases:
        raise LookupError("no case has both our SEG and a reference SEG of the same series")
    report.unmatched = len(set(ours) ^ set(references))
    return [(c, ours[c], references[c]) for c in cases]


def _pair_niftis(
    report: EvaluationReport, ours: dict[str, Path], niftis: list[Path]
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
    report.unmatched = len(ours) - len(pairs) + len(niftis) - len(pairs)
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


def _run_lidc(run: _Run, ours: Path, cases: dict[str, LidcCase]) -> None:
    options, report = run.options, run.report
    scanned = scan_ours(ours)  # one walk for our SEGs and our findings
    ours_segs = scanned.segs
    if options.findings is not None:
        findings = findings_for(options.findings, run.grids)
    else:
        findings = findings_in(scanned.findings, run.grids)
    if "" in findings:
        if len(cases) != 1:
            raise EvaluationError(
                "a findings list without series UIDs needs exactly one reference case; "
                "give an object of series UID -> findings"
            )
        findings.setdefault(next(iter(cases)), []).extend(findings.pop(""))
    detect = bool(findings) or options.findings is not None
    if not ours_segs and not detect:
        raise LookupError(f"no DICOM SEG or findings found in {ours}")
    references: dict[str, list[Any]] = {}
    progress = Progress(len(cases), options.progress)
    for uid, case in sorted(cases.items()):
        try:
            grid, source = _lidc_grid(run, case, ours_segs)
            if detect:
                references[uid] = reference_nodules(
                    case, grid, options.min_readers, options.include_small, source
                )
            if uid in ours_segs:
                masks = compare_lidc_case(
                    ours_segs[uid], case, grid, options.segment, options.min_readers, source
                )
                run.add_case(uid, masks)
        except EvaluationError as exc:
            report.problems.append(str(exc))
        progress.advance()
    if detect and references:
        extra = sorted(set(findings) - set(references))
        report.unmatched += len(extra)
        report.detection = evaluate_detection(
            {u: f for u, f in findings.items() if u in references}, references, options.threshold
        )
    if ours_segs:
        report.unmatched += len(set(ours_segs) - set(cases))
