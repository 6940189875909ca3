"""``dicomnode evaluate``: our SEGs and findings against references, per case and overall.

REFERENCE is a DICOM SEG, a NIfTI label volume or LIDC XML (a file, or a folder of
them); its kind decides the comparison (:mod:`dicomnode.evaluate.run`):

* SEG: segments paired by label.
* NIfTI: label value N is our segment number N, or as ``--label-map`` says; one file
  per case, named after the source series UID or after our SEG file.
* LIDC XML: our nodule segment(s) against the readers' outlines, and, with findings
  (``--findings FILE.json``, or findings in OURS), detection metrics against the
  consensus nodules. The source geometry comes from ``--images``, from DICOM images
  beside the XML, or from our SEG's frames.
"""

from __future__ import annotations

import argparse
import sys

from dicomnode.cli.output import print_json, print_table
from dicomnode.config import Settings
from dicomnode.evaluate import (
    DETECTION_HEADERS,
    SEGMENTATION_HEADERS,
    EvaluationOptions,
    EvaluationReport,
    closing_notes,
    detection_notes,
    detection_rows,
    evaluate_folders,
    report_record,
    segmentation_rows,
)


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
    options = EvaluationOptions(
        images=tuple(args.images or ()),
        findings=args.findings,
        label_map=tuple(args.label_map or ()),
        segment=args.segment,
        min_readers=args.min_readers,
        include_small=args.include_small,
        threshold=args.threshold,
        plots=args.plots,
        # A bar redrawn in a log file or a pipe is noise: a terminal only, unless asked.
        progress=args.progress or (sys.stderr.isatty() and not args.json),
    )
    report = evaluate_folders(args.ours, args.reference, options)  # UsageError: exit 2
    if args.json:
        print_json(report_record(report))
    else:
        _print_report(report)
    return 1 if report.problems else 0


def _print_report(report: EvaluationReport) -> None:
    if report.segmentation:
        print_table(SEGMENTATION_HEADERS, segmentation_rows(report))
    if report.detection is not None:
        if report.segmentation:
            print()
        print_table(DETECTION_HEADERS, detection_rows(report.detection))
        for line in detection_notes(report.detection):
            print(line)
    for line in closing_notes(report):
        print(line)
