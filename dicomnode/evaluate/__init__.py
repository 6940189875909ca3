"""``dicomnode evaluate``: our SEGs and findings compared with references.

References are DICOM SEGs, NIfTI label volumes or LIDC readers' XML; scores are Dice,
IoU, surface distances, and for detections sensitivity, FROC and CPM. The use case
lives here; the CLI parses its options and prints the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.evaluate.progress import Progress
    from dicomnode.evaluate.report import (
        DETECTION_HEADERS,
        SEGMENTATION_HEADERS,
        EvaluationReport,
        closing_notes,
        detection_notes,
        detection_rows,
        report_record,
        segmentation_rows,
    )
    from dicomnode.evaluate.run import EvaluationOptions, evaluate_folders

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "DETECTION_HEADERS": "dicomnode.evaluate.report",
    "EvaluationOptions": "dicomnode.evaluate.run",
    "EvaluationReport": "dicomnode.evaluate.report",
    "Progress": "dicomnode.evaluate.progress",
    "SEGMENTATION_HEADERS": "dicomnode.evaluate.report",
    "closing_notes": "dicomnode.evaluate.report",
    "detection_notes": "dicomnode.evaluate.report",
    "detection_rows": "dicomnode.evaluate.report",
    "evaluate_folders": "dicomnode.evaluate.run",
    "report_record": "dicomnode.evaluate.report",
    "segmentation_rows": "dicomnode.evaluate.report",
}

__all__ = [
    "DETECTION_HEADERS",
    "SEGMENTATION_HEADERS",
    "EvaluationOptions",
    "EvaluationReport",
    "Progress",
    "closing_notes",
    "detection_notes",
    "detection_rows",
    "evaluate_folders",
    "report_record",
    "segmentation_rows",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
