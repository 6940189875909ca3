"""The DICOM objects the node writes: SEG, TID 1500 SR, Secondary Capture, rejection notes.

Builders take arrays and datasets and return datasets (no database, no network);
UIDs and provenance come from :mod:`~dicomnode.outputs.provenance`, and
:mod:`~dicomnode.outputs.validate` checks every object before it is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.exports import lazy_exports

if TYPE_CHECKING:
    from dicomnode.outputs.contours import segment_outlines
    from dicomnode.outputs.findings import (
        detection_summary,
        finding_segments,
        reported_findings,
        series_class,
        study_finding,
    )
    from dicomnode.outputs.headers import repair_source_headers
    from dicomnode.outputs.overlay import (
        LegendEntry,
        colorize,
        default_window,
        measurement_texts,
        montage,
        select_slices,
        windowed,
    )
    from dicomnode.outputs.palette import PALETTE
    from dicomnode.outputs.preview import label_volume, preview_montage, segment_entries
    from dicomnode.outputs.provenance import RESEARCH_NOTICE, Provenance
    from dicomnode.outputs.rejection import build_rejection_note
    from dicomnode.outputs.sc import build_overlay_capture
    from dicomnode.outputs.seg import build_segmentation, read_labels, segment_tracking_uid
    from dicomnode.outputs.sr import PriorComparison, build_measurement_report
    from dicomnode.outputs.validate import validate_file

# Each public name and the module it lives in. The modules load when a name is first
# used, so importing one of them does not import its siblings (the CLI's start-up).
_HOMES = {
    "LegendEntry": "dicomnode.outputs.overlay",
    "PALETTE": "dicomnode.outputs.palette",
    "PriorComparison": "dicomnode.outputs.sr",
    "Provenance": "dicomnode.outputs.provenance",
    "RESEARCH_NOTICE": "dicomnode.outputs.provenance",
    "build_measurement_report": "dicomnode.outputs.sr",
    "build_overlay_capture": "dicomnode.outputs.sc",
    "build_rejection_note": "dicomnode.outputs.rejection",
    "build_segmentation": "dicomnode.outputs.seg",
    "colorize": "dicomnode.outputs.overlay",
    "default_window": "dicomnode.outputs.overlay",
    "detection_summary": "dicomnode.outputs.findings",
    "finding_segments": "dicomnode.outputs.findings",
    "label_volume": "dicomnode.outputs.preview",
    "measurement_texts": "dicomnode.outputs.overlay",
    "montage": "dicomnode.outputs.overlay",
    "preview_montage": "dicomnode.outputs.preview",
    "read_labels": "dicomnode.outputs.seg",
    "repair_source_headers": "dicomnode.outputs.headers",
    "reported_findings": "dicomnode.outputs.findings",
    "segment_entries": "dicomnode.outputs.preview",
    "segment_outlines": "dicomnode.outputs.contours",
    "segment_tracking_uid": "dicomnode.outputs.seg",
    "select_slices": "dicomnode.outputs.overlay",
    "series_class": "dicomnode.outputs.findings",
    "study_finding": "dicomnode.outputs.findings",
    "validate_file": "dicomnode.outputs.validate",
    "windowed": "dicomnode.outputs.overlay",
}

__all__ = [
    "PALETTE",
    "RESEARCH_NOTICE",
    "LegendEntry",
    "PriorComparison",
    "Provenance",
    "build_measurement_report",
    "build_overlay_capture",
    "build_rejection_note",
    "build_segmentation",
    "colorize",
    "default_window",
    "detection_summary",
    "finding_segments",
    "label_volume",
    "measurement_texts",
    "montage",
    "preview_montage",
    "read_labels",
    "repair_source_headers",
    "reported_findings",
    "segment_entries",
    "segment_outlines",
    "segment_tracking_uid",
    "select_slices",
    "series_class",
    "study_finding",
    "validate_file",
    "windowed",
]
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
