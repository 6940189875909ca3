"""TID 1500 Measurement Report as a Comprehensive 3D SR, with highdicom.

One Volumetric ROI Measurements group per segment, each referencing its SEG
segment and the source series, so that OHIF and other TID 1500 readers can show
the measurements beside the segmentation.

Each segment also gets a Planar ROI group with the same Tracking UID: its outline on
the slice where it is largest. Viewers that read TID 1500 by finding, OHIF among them,
merge the groups of one Tracking UID, and OHIF draws and labels a finding only when one
of its groups has image coordinates (a finding without any makes OHIF 3 drop the
whole report); the outline is what lets it show each lung's volume on the image.

A detection model adds, per finding, a Planar ROI group: a circle of the finding's
long axis on the source image through its centre, with its long and short axes and
the model's probability. Its Tracking UID is that of the finding's SEG segment, so
both groups describe one finding. Whether any finding is present, with the best
probability seen (and a classification model's verdict), goes in the report's
Qualitative Evaluations, outside the measurement groups, for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom import sr
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.imaging import CodeSpec, SegmentSpec, SegmentStats
from dicomnode.outputs.codes import (
    ABSENT,
    ATTENUATION,
    CT_CHEST,
    CT_UNSPECIFIED,
    DIAMETER,
    FINDING,
    HOUNSFIELD_UNIT,
    IMAGING_MEASUREMENTS,
    IMAGING_PROCEDURE,
    LAA_950,
    LUNG,
    LUNG_CODES,
    MEAN,
    MILLILITER,
    MILLIMETER,
    MR_UNSPECIFIED,
    NO_UNITS,
    PERCENT,
    PRESENT,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    SHORT_AXIS,
    STANDARD_DEVIATION,
    VOLUME,
    coded,
)
from dicomnode.outputs.provenance import MANUFACTURER, Provenance
from dicomnode.outputs.seg import contributing_equipment


def _procedure(source: Dataset) -> hd.sr.CodedConcept:
    body_part = str(source.get("BodyPartExamined", "")).upper()
    modality = source.get("Modality")
    if modality == "CT":
        return CT_CHEST if body_part in ("CHEST", "THORAX", "LUNG") else CT_UNSPECIFIED
    if modality == "MR":
        return MR_UNSPECIFIED
    return IMAGING_PROCEDURE


@dataclass(frozen=True)
class ReportedFinding:
    """A detection model's finding, as the report states it.

    Attributes
    ----------
    segment_number : int
        Its segment in the SEG (findings and segments are numbered alike).
    source : Dataset
        The source image through the finding's centre.
    frame_number : int or None
        That image's frame, for a multi-frame source.
    column, row : float
        The centre on that image, in pixels.
    radius_px : float
        Half the diameter, in pixels along a row.
    diameter_mm : float
        Longest axial diameter (long axis).
    short_axis_mm : float
        The width perpendicular to it.
    probability : float
        The model's probability.
    """

    segment_number: int
    source: Dataset
    frame_number: int | None
    column: float
    row: float
    radius_px: float
    diameter_mm: float
    short_axis_mm: float
    probability: float


@dataclass(frozen=True)
class SegmentOutline:
    """A segment's outline on the source image where it is largest.

    Attributes
    ----------
    segment_number : int
        Its segment in the SEG.
    source : Dataset
        That source image.
    frame_number : int or None
        Its frame, for a multi-frame source.
    points : np.ndarray
        ``(n, 2)`` closed polyline, ``(column, row)`` in SCOORD pixel coordinates.
    """

    segment_number: int
    source: Dataset
    frame_number: int | None
    points: np.ndarray


def _source_image(source: Dataset, frame_number: int | None) -> sr.SourceImageForRegion:
    return sr.SourceImageForRegion(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=None if frame_number is None else [frame_number],
    )


@dataclass(frozen=True)
class StudyFinding:
    """A classification of the whole series: a finding present or absent, or a class.

    Attributes
    ----------
    finding : CodeSpec
        What is classified, e.g. "Pulmonary nodule".
    present : bool
        Whether it is present (ignored when ``chosen`` is given).
    best_probability : float
        The probability behind the verdict.
    chosen : CodeSpec, optional
        For a multi-class model: the chosen class, reported as the group's Finding.
    scope : str
        "Study-level" or "Series-level", for the group's tracking identifier.
    """

    finding: CodeSpec
    present: bool
    best_probability: float
    chosen: CodeSpec | None = None
    scope: str = "Study-level"


def _finding_group(
    finding: ReportedFinding,
    code: CodeSpec,
    tracking: sr.TrackingIdentifier,
    algorithm: sr.AlgorithmIdentification,
) -> sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    region = sr.ImageRegion(
        graphic_type=sr.GraphicTypeValues.CIRCLE,
        # A circle is its centre and one point on its edge.
        graphic_data=np.array(
            [
                [finding.column, finding.row],
                [finding.column + max(finding.radius_px, 1.0), finding.row],
            ]
        ),
        source_image=_source_image(finding.source, finding.frame_number),
    )
    return sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=coded(code),
        finding_sites=[sr.FindingSite(LUNG)],
        algorithm_id=algorithm,
        measurements=[
            sr.Measurement(
                name=DIAMETER,
                value=round(finding.diameter_mm, 1),
                unit=MILLIMETER,
                algorithm_id=algorithm,
            ),
            sr.Measurement(
                name=SHORT_AXIS,
                value=round(finding.short_axis_mm, 1),
                unit=MILLIMETER,
                algorithm_id=algorithm,
            ),
            _probability(finding.probability, algorithm),
        ],
    )


def _probability(value: float, algorithm: sr.AlgorithmIdentification) -> sr.Measurement:
    return sr.Measurement(
        name=PROBABILITY, value=round(value, 4), unit=NO_UNITS, algorithm_id=algorithm
    )


def _outline_group(
    outline: SegmentOutline,
    segment: SegmentSpec,
    tracking: sr.TrackingIdentifier,
    algorithm: sr.AlgorithmIdentification,
) -> sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    region = sr.ImageRegion(
        graphic_type=sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline.points,
        source_image=_source_image(outline.source, outline.frame_number),
    )
    return sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=coded(segment.type),
        finding_category=coded(segment.category),
        algorithm_id=algorithm,
    )


@dataclass(frozen=True)
class PriorComparison:
    """The comparison with a prior study, as the report states it.

    Attributes
    ----------
    prior_study_uid : str or None
        The study compared with (its instances are the report's Pertinent Other
        Evidence; the heading names it); None when there was no comparison.
    heading : str
        One line: what was compared (or why nothing was).
    changes : Sequence[str]
        One line per nodule: matched (sizes then and now, change, doubling time or why
        none), new, or no longer seen.
    """

    prior_study_uid: str | None
    heading: str
    changes: Sequence[str] = ()


def _comparison_items(comparison: PriorComparison) -> list[sr.ContentItem]:
    """Return the comparison's items for TID 1500's Qualitative Evaluations container."""
    contains = sr.RelationshipTypeValues.CONTAINS
    items: list[sr.ContentItem] = [
        sr.TextContentItem(
            name=codes.DCM.ComparisonToPreviousStudies,
            value=comparison.heading[:1024],
            relationship_type=contains,
        )
    ]
    items.extend(
        sr.TextContentItem(
            name=codes.DCM.DescriptionOfChange, value=line[:1024], relationship_type=contains
        )
        for line in comparison.changes
    )
    return items


def _verdict(
    study: StudyFinding, provenance: Provenance, comparison: PriorComparison | None = None
) -> sr.ContainerContentItem:
    """Return TID 1500's Qualitative Evaluations: the verdict and its probability.

    The answer is "Present" or "Absent" to the question asked (e.g. "Pulmonary
    nodule"), or a multi-class model's class as the "Finding". The probability, which
    that container's content items cannot hold as a number, is a text item beside it.
    """
    container = sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=sr.RelationshipTypeValues.CONTAINS,
    )
    # A yes/no model answers its own question; a multi-class one says which Finding.
    question, value = (
        (FINDING, coded(study.chosen))
        if study.chosen is not None
        else (coded(study.finding), PRESENT if study.present else ABSENT)
    )
    container.ContentSequence = sr.ContentSequence(
        [
            sr.CodeContentItem(
                name=question,
                value=value,
                relationship_type=sr.RelationshipTypeValues.CONTAINS,
            ),
            sr.TextContentItem(
                name=PROBABILITY,
                value=(
                    f"{study.best_probability:.4f} ({study.scope.lower()}, "
                    f"{provenance.model_name} {provenance.model_version})"
                ),
                relationship_type=sr.RelationshipTypeValues.CONTAINS,
            ),
            *(() if comparison is None else _comparison_items(comparison)),
        ]
    )
    return container


def build_measurement_report(
    segmentation: Dataset | None,
    source_images: Sequence[Dataset],
    stats: Sequence[SegmentStats],
    segments: Sequence[SegmentSpec],
    provenance: Provenance,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    findings: Sequence[ReportedFinding] = (),
    study: StudyFinding | None = None,
    outlines: Sequence[SegmentOutline] = (),
    comparison: PriorComparison | None = None,
    other_evidence: Sequence[Dataset] = (),
) -> sr.Comprehensive3DSR:
    """Build a TID 1500 report of per-segment volume and mean value (and findings).

    Parameters
    ----------
    segmentation : Dataset or None
        The SEG whose segments are measured; None when a detection found nothing.
    source_images : Sequence[Dataset]
        The source instances (evidence).
    stats : Sequence[SegmentStats]
        Measurements per segment, in segment order.
    segments : Sequence[SegmentSpec]
        Codes of each segment, in segment order.
    provenance : Provenance
        Model and software.
    series_uid, sop_uid : str
        UIDs of the new object.
    series_number : int
        Series Number of the new series.
    findings : sequence of ReportedFinding
        A detection model's findings, each with its own segment.
    study : StudyFinding, optional
        The study- or series-level verdict of a detection or classification model.
    outlines : sequence of SegmentOutline
        Outlines of segments (not findings), each drawn with its segment's measurements.
    comparison : PriorComparison, optional
        For a route with priors: the comparison with the prior study, or why there was
        none, beside the verdict (it needs ``study``).
    other_evidence : sequence of Dataset
        Instances of another study the report relies on (the prior it compared with):
        listed as Pertinent Other Evidence.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The report.
    """
    source_series = str(source_images[0].SeriesInstanceUID)
    algorithm = sr.AlgorithmIdentification(
        name=provenance.model_name, version=provenance.model_version
    )
    observer = sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.uid("device", MANUFACTURER, provenance.model_name),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=provenance.model_name,
        ),
    )
    tracking_uids = (
        {}
        if segmentation is None
        else {
            # A LABELMAP SEG's segment 0 is highdicom's Background, with no Tracking UID.
            int(i.SegmentNumber): str(i.TrackingUID)
            for i in segmentation.SegmentSequence
            if "TrackingUID" in i
        }
    )
    is_ct = source_images[0].get("Modality") == "CT"
    groups = []
    for stat, seg in zip(stats, segments, strict=True):
        measurements = [
            sr.Measurement(
                name=VOLUME, value=round(stat.volume_ml, 3), unit=MILLILITER, algorithm_id=algorithm
            )
        ]
        # Only CT values are calibrated (HU); for other modalities a mean has no unit.
        if is_ct and not math.isnan(stat.mean):
            measurements += [
                sr.Measurement(
                    name=ATTENUATION,
                    value=round(value, 3),
                    unit=HOUNSFIELD_UNIT,
                    derivation=derivation,
                    algorithm_id=algorithm,
                )
                for value, derivation in ((stat.mean, MEAN), (stat.std, STANDARD_DEVIATION))
            ]
            if seg.type.scheme == "SCT" and seg.type.value in LUNG_CODES:
                measurements.append(
                    sr.Measurement(
                        name=LAA_950,
                        value=round(stat.below_950, 3),
                        unit=PERCENT,
                        algorithm_id=algorithm,
                    )
                )
        groups.append(
            sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                # The same Tracking UID as the SEG segment: one finding, one identity.
                tracking_identifier=sr.TrackingIdentifier(
                    uid=tracking_uids[stat.number], identifier=seg.label
                ),
                referenced_segment=sr.ReferencedSegment(
                    sop_class_uid=segmentation.SOPClassUID,  # type: ignore[union-attr]
                    sop_instance_uid=segmentation.SOPInstanceUID,  # type: ignore[union-attr]
                    segment_number=stat.number,
                    source_series=sr.SourceSeriesForSegmentation(source_series),
                ),
                finding_type=coded(seg.type),
                finding_category=coded(seg.category),
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
    finding_groups: list[sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for finding in findings:
        segment = segments[finding.segment_number - 1]
        tracking = sr.TrackingIdentifier(
            uid=tracking_uids[finding.segment_number], identifier=segment.label
        )
        finding_groups.append(_finding_group(finding, segment.type, tracking, algorithm))
    outline_groups = [
        _outline_group(
            outline,
            segments[outline.segment_number - 1],
            sr.TrackingIdentifier(
                uid=tracking_uids[outline.segment_number],
                identifier=segments[outline.segment_number - 1].label,
            ),
            algorithm,
        )
        for outline in outlines
    ]
    # A finding's groups first: OHIF lists the merged measurements in group order and
    # labels a drawing with the first five (diameters and probability first).
    measured: list[
        sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | sr.MeasurementsAndQualitativeEvaluations
    ] = [*finding_groups, *groups, *outline_groups]
    if not measured and study is None:
        raise ValueError("a report needs measurements or a verdict")
    report = sr.MeasurementReport(
        observation_context=sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure(source_images[0]),
        # highdicom asks for one group at least; TID 1500 asks for Imaging Measurements
        # or Qualitative Evaluations. A verdict alone drops this stand-in below.
        imaging_measurements=measured
        or [sr.MeasurementsAndQualitativeEvaluations(sr.TrackingIdentifier("1.2.3", "none"))],
    )
    if not measured:
        report[0].ContentSequence = sr.ContentSequence(
            [i for i in report[0].ContentSequence if i.name != IMAGING_MEASUREMENTS],
            is_root=False,
        )
    if study is not None:
        report[0].ContentSequence.append(_verdict(study, provenance, comparison))
    evidence = list(source_images) if segmentation is None else [segmentation, *source_images]
    # highdicom lists instances of other studies as Pertinent Other Evidence.
    evidence.extend(other_evidence)
    return sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=provenance.series_description("SR"),
        contributing_equipment=[contributing_equipment(provenance)],
    )
