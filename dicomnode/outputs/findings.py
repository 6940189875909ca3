"""A detection model's findings, turned into SEG segments, SR items and a job summary."""

from __future__ import annotations

from typing import Any

from dicomnode.imaging import ClassificationResult, DetectionResult, ModelSpec, SegmentSpec, Volume
from dicomnode.outputs.codes import MORPHOLOGICALLY_ABNORMAL
from dicomnode.outputs.palette import PALETTE
from dicomnode.outputs.sr import ReportedFinding, StudyFinding


def finding_segments(spec: ModelSpec, count: int) -> list[SegmentSpec]:
    """Return one SEG segment per finding: "Nodule 1", "Nodule 2", ...

    Parameters
    ----------
    spec : ModelSpec
        The detection package; its ``detection.finding`` is each segment's type.
    count : int
        How many findings there are.

    Returns
    -------
    list[SegmentSpec]
        In finding order (best first).
    """
    word = spec.detection.finding.meaning.split()[-1].capitalize()
    return [
        SegmentSpec(
            label=f"{word} {number}",
            category=MORPHOLOGICALLY_ABNORMAL,
            type=spec.detection.finding,
            color=PALETTE[(number - 1) % len(PALETTE)],
        )
        for number in range(1, count + 1)
    ]


def reported_findings(result: DetectionResult, volume: Volume) -> list[ReportedFinding]:
    """Return the findings as the SR states them, each on its centre's source image.

    Parameters
    ----------
    result : DetectionResult
        The findings.
    volume : Volume
        Their series.

    Returns
    -------
    list[ReportedFinding]
        Numbered like their segments.
    """
    out = []
    for number, finding in enumerate(result.findings, start=1):
        source, frame = volume.source_of(finding.slice_index)
        out.append(
            ReportedFinding(
                segment_number=number,
                source=source,
                frame_number=frame if volume.is_multiframe else None,
                # SCOORD puts a pixel's centre at index + 0.5 (PS3.3 C.18.6.1.2).
                column=round(float(finding.center_index[2]) + 0.5, 2),
                row=round(float(finding.center_index[1]) + 0.5, 2),
                radius_px=finding.diameter_mm / 2 / volume.pixel_spacing[1],
                diameter_mm=finding.diameter_mm,
                short_axis_mm=finding.short_axis_mm,
                probability=finding.probability,
            )
        )
    return out


def study_finding(spec: ModelSpec, result: DetectionResult) -> StudyFinding:
    """Return the study-level classification: any finding present or not."""
    return StudyFinding(
        finding=spec.detection.finding,
        present=bool(result.findings),
        best_probability=result.best_probability,
    )


def series_class(spec: ModelSpec, result: ClassificationResult) -> StudyFinding:
    """Return a classification model's verdict on the series, as the SR states it.

    Parameters
    ----------
    spec : ModelSpec
        The classification package.
    result : ClassificationResult
        Its scores.

    Returns
    -------
    StudyFinding
        One class: present or absent with its probability. Several: the chosen class as
        the Finding, with its probability.
    """
    classes = spec.output.classes
    if len(classes) == 1 and spec.output.kind != "softmax":
        return StudyFinding(
            finding=classes[0].code,
            present=result.chosen is not None,
            best_probability=result.probability,
            scope="Series-level",
        )
    assert result.chosen is not None  # argmax always chooses
    return StudyFinding(
        finding=classes[0].code,  # what the group is about stays one code across re-runs
        present=True,
        best_probability=result.probability,
        chosen=result.chosen.code,
        scope="Series-level",
    )


def detection_summary(result: DetectionResult, volume: Volume) -> dict[str, Any]:
    """Return the findings for the job's summary (``dicomnode jobs show``).

    Each finding's centre is given in patient coordinates (LPS, mm) and as the slice
    through it: its position in the series (1 = first in slice order) and that
    image's Instance Number, as viewers show them.
    """
    findings = []
    for number, finding in enumerate(result.findings, start=1):
        source, _ = volume.source_of(finding.slice_index)
        instance = source.get("InstanceNumber")
        findings.append(
            {
                "number": number,
                "center_mm": [round(float(v), 1) for v in finding.center],
                "slice": finding.slice_index + 1,
                "instance_number": None if instance in (None, "") else int(instance),
                "diameter_mm": round(finding.diameter_mm, 1),
                "short_axis_mm": round(finding.short_axis_mm, 1),
                "volume_ml": round(len(finding.voxels) * volume.voxel_volume_ml, 2),
                # Unrounded enough for growth: 0.01 mL is a fifth of a 4 mm nodule.
                "volume_mm3": round(len(finding.voxels) * volume.voxel_volume_ml * 1000, 1),
                "probability": round(finding.probability, 4),
            }
        )
    return {
        "candidates": result.candidates,
        "present": bool(result.findings),
        "best_probability": round(result.best_probability, 4),
        "findings": findings,
    }
