"""TID 1500 Measurement Report as a Comprehensive 3D SR, with highdicom.

One Volumetric ROI Measurements group per segment, each referencing its SEG
segment and the source series, so that OHIF and other TID 1500 readers can show
the measurements beside the segmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
from highdicom import sr
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.inference.measurements import SegmentStats
from dicomnode.inference.registry import SegmentSpec
from dicomnode.outputs.codes import (
    ATTENUATION,
    CT_CHEST,
    CT_UNSPECIFIED,
    HOUNSFIELD_UNIT,
    IMAGING_PROCEDURE,
    MEAN,
    MILLILITER,
    MR_UNSPECIFIED,
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


def build_measurement_report(
    segmentation: Dataset,
    source_images: Sequence[Dataset],
    stats: Sequence[SegmentStats],
    segments: Sequence[SegmentSpec],
    provenance: Provenance,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
) -> sr.Comprehensive3DSR:
    """Build a TID 1500 report of per-segment volume and mean value.

    Parameters
    ----------
    segmentation : Dataset
        The SEG whose segments are measured.
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
    tracking_uids = {
        int(item.SegmentNumber): str(item.TrackingUID) for item in segmentation.SegmentSequence
    }
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
            measurements.append(
                sr.Measurement(
                    name=ATTENUATION,
                    value=round(stat.mean, 3),
                    unit=HOUNSFIELD_UNIT,
                    derivation=MEAN,
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
                    sop_class_uid=segmentation.SOPClassUID,
                    sop_instance_uid=segmentation.SOPInstanceUID,
                    segment_number=stat.number,
                    source_series=sr.SourceSeriesForSegmentation(source_series),
                ),
                finding_type=coded(seg.type),
                finding_category=coded(seg.category),
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
    report = sr.MeasurementReport(
        observation_context=sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure(source_images[0]),
        imaging_measurements=groups,
    )
    return sr.Comprehensive3DSR(
        evidence=[segmentation, *source_images],
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
