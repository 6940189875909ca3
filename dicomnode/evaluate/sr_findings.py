"""Findings read back from the TID 1500 reports that dicomnode writes.

Each finding is a Planar ROI group: a circle on the source image through its centre,
with a Diameter and a Probability measurement. The circle is in that image's pixels,
so its patient coordinates come from the image's geometry (the source series).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.errors import EvaluationError
from dicomnode.evaluate.detection import Finding
from dicomnode.evaluate.geometry import SourceGrid

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def source_series(ds: pydicom.Dataset) -> str:
    """Return the UID of the image series an SR reports on (its evidence, SEGs aside).

    Parameters
    ----------
    ds : pydicom.Dataset
        The SR.

    Returns
    -------
    str
        The Series Instance UID, or "" when the evidence names none.
    """
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            classes = {str(i.ReferencedSOPClassUID) for i in series.ReferencedSOPSequence}
            if classes and SEG_CLASS not in classes:
                return str(series.SeriesInstanceUID)
    return ""


def _value(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, name: Code) -> float:
    found = group.get_measurements(name=name)
    if not found:
        raise EvaluationError(f"a finding without {name.meaning}")
    return float(found[0].value)


def read_findings(path: Path, grids: Mapping[str, SourceGrid]) -> tuple[str, list[Finding]]:
    """Return the source series and the findings of one of our SR files.

    Parameters
    ----------
    path : Path
        A Comprehensive 3D SR written by dicomnode.
    grids : mapping
        Source geometry by series UID (from ``--images`` or the reference's folder).

    Returns
    -------
    tuple[str, list[Finding]]
        The series UID and each finding's centre (LPS, mm), diameter and probability.

    Raises
    ------
    EvaluationError
        If the SR is not a TID 1500 report, or its findings lie on images whose
        geometry is unknown.
    """
    ds = pydicom.dcmread(path)
    series = source_series(ds)
    try:
        content = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False).content
        if not isinstance(content, hd.sr.MeasurementReport):
            raise ValueError("its content is no TID 1500 Measurement Report")
    except (AttributeError, ValueError, TypeError) as exc:
        raise EvaluationError(f"{path}: not a TID 1500 measurement report ({exc})") from None
    geometries = {}
    for grid in grids.values():
        geometries.update({uid: (grid, g) for uid, g in grid.geometries().items()})
    findings = []
    for group in content.get_planar_roi_measurement_groups():
        roi = group.roi
        if roi is None or roi.GraphicType != "CIRCLE":
            continue
        uid = str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        if uid not in geometries:
            raise EvaluationError(
                f"{path}: a finding lies on image {uid}, whose geometry is unknown; "
                "give the source images with --images"
            )
        grid, geometry = geometries[uid]
        # SCOORD has a pixel's centre at index + 0.5; the geometry counts from centres.
        column, row = np.asarray(roi.GraphicData, dtype=float).reshape(-1, 2)[0] - 0.5
        findings.append(
            Finding(
                center=geometry.to_patient(column, row),
                diameter_mm=_value(group, codes.SCT.Diameter),
                probability=_value(group, codes.DCM.Probability),
            )
        )
        series = series or grid.series_uid
    return series, findings


def read_verdicts(ds: pydicom.Dataset) -> dict[str, tuple[hd.sr.CodedConcept, float]]:
    """Return a report's verdicts: what was asked, the answer and its probability.

    A detection model says whether any finding is present, a classification model
    which class the series is; both are in TID 1500's Qualitative Evaluations
    container, each a coded answer followed by a text item with its probability.

    Parameters
    ----------
    ds : pydicom.Dataset
        A Comprehensive 3D SR written by dicomnode.

    Returns
    -------
    dict
        The question's code meaning -> (the coded answer, the probability).
    """
    out: dict[str, tuple[hd.sr.CodedConcept, float]] = {}
    for container in ds.get("ContentSequence", []):
        name = container.ConceptNameCodeSequence[0]
        if (name.CodingSchemeDesignator, name.CodeValue) != ("UMLS", "C0034375"):
            continue
        question: str | None = None
        answer: hd.sr.CodedConcept | None = None
        for item in container.get("ContentSequence", []):
            if item.ValueType == "CODE":
                question = str(item.ConceptNameCodeSequence[0].CodeMeaning)
                answer = hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])
            elif item.ValueType == "TEXT" and question is not None and answer is not None:
                out[question] = (answer, float(str(item.TextValue).split()[0]))
    return out
