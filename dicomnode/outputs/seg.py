"""DICOM Segmentation objects with highdicom."""

from __future__ import annotations

import re
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicomnode.inference.registry import SegmentSpec
from dicomnode.outputs.codes import ARTIFICIAL_INTELLIGENCE, PROCESSING_EQUIPMENT, coded
from dicomnode.outputs.provenance import MANUFACTURER, RESEARCH_NOTICE, Provenance


def algorithm_identification(provenance: Provenance) -> hd.AlgorithmIdentificationSequence:
    """Return the Segment Algorithm Identification for our model.

    Parameters
    ----------
    provenance : Provenance
        The model and software.

    Returns
    -------
    highdicom.AlgorithmIdentificationSequence
        Name, version and family (artificial intelligence).
    """
    return hd.AlgorithmIdentificationSequence(
        name=provenance.model_name,
        version=provenance.model_version,
        family=ARTIFICIAL_INTELLIGENCE,
    )


def contributing_equipment(provenance: Provenance) -> hd.ContributingEquipment:
    """Return Contributing Equipment naming dicomnode and the model as the processor.

    Parameters
    ----------
    provenance : Provenance
        The model and software.

    Returns
    -------
    highdicom.ContributingEquipment
        One item of the Contributing Equipment Sequence.
    """
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=provenance.model_name,
        software_versions=provenance.software_versions,
        contribution_description=f"AI segmentation by {provenance.model_name}"[:64],
    )


def build_segmentation(
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    segments: Sequence[SegmentSpec],
    provenance: Provenance,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG of a label map on the source images' grid.

    Parameters
    ----------
    source_images : Sequence[Dataset]
        The source instances, in the order of ``labels``' first axis.
    labels : np.ndarray
        ``(frames, rows, columns)`` integer labels: 0 background, ``i`` segment ``i``.
    segments : Sequence[SegmentSpec]
        Label, codes and colour of each segment, in label order.
    provenance : Provenance
        Model and software, for algorithm identification and descriptions.
    series_uid, sop_uid : str
        UIDs of the new object.
    series_number : int
        Series Number of the new series.

    Returns
    -------
    highdicom.seg.Segmentation
        The object; frames reference their source instances.
    """
    algorithm = algorithm_identification(provenance)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=seg.label,
            segmented_property_category=coded(seg.category),
            segmented_property_type=coded(seg.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=provenance.uid(series_uid, "segment", str(number)),
            tracking_id=seg.label,
            display_color=hd.color.CIELabColor.from_rgb(*seg.color),
        )
        for number, seg in enumerate(segments, start=1)
    ]
    content_label = re.sub(r"[^A-Z0-9_ ]", "_", provenance.model_name.upper())[:16]
    return hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=provenance.model_name,
        # highdicom annotates str | tuple but takes any sequence (SoftwareVersions is LO 1-n).
        software_versions=provenance.software_versions,  # type: ignore[arg-type]
        device_serial_number="0",
        content_label=content_label,
        content_description=(None if provenance.clinical_use else RESEARCH_NOTICE),
        content_creator_name=None,
        series_description=provenance.series_description("SEG"),
        contributing_equipment=[contributing_equipment(provenance)],
    )
