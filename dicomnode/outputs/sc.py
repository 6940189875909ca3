"""A Multi-frame True Color Secondary Capture of the overlay, for viewers without SEG.

Many PACS viewers cannot display DICOM SEG. For them a route can add one RGB
multi-frame Secondary Capture in its own series: the slices with any segment,
windowed, each segment outlined in its colour, with a legend and, for research
models, "NOT FOR CLINICAL USE" burned in (:mod:`dicomnode.outputs.overlay`).

One multi-frame object rather than one single-frame image per slice: it is one
output to write, validate and deliver, it scrolls like a stack in the viewers that
show it, and the single-frame SC IOD carries no more geometry than this one does
(neither has the Image Plane module). What the IOD allows is kept: the Source Image
Sequence lists each frame's source image in frame order, the Slice Location Vector
gives each frame's position along the slice normal, and Pixel Spacing and Patient
Orientation are the source's, since the frames are on the source grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.imaging import SegmentSpec, Volume
from dicomnode.outputs.overlay import (
    LegendEntry,
    Window,
    default_window,
    measurement_texts,
    render_overlay,
)
from dicomnode.outputs.provenance import MANUFACTURER, RESEARCH_NOTICE, Provenance
from dicomnode.outputs.seg import contributing_equipment

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color Secondary Capture
ALL_SLICES_UP_TO = 12  # a series this short is shown whole, segments or not
SLICE_LOCATION_VECTOR = Tag(0x0018, 0x2005)


def overlay_slices(labels: np.ndarray) -> list[int]:
    """Return the slices the overlay shows: those with any segment, or all if few.

    Parameters
    ----------
    labels : np.ndarray
        ``(slices, rows, columns)`` labels.

    Returns
    -------
    list[int]
        Slice indices in volume order; all slices for a short series or an empty mask.
    """
    slices = labels.shape[0]
    occupied = np.flatnonzero(labels.reshape(slices, -1).any(axis=1))
    if slices <= ALL_SLICES_UP_TO or occupied.size == 0:
        return list(range(slices))
    return [int(k) for k in occupied]


def patient_orientation(direction: np.ndarray) -> str:
    """Return the Patient Orientation letters of a direction (LPS), largest first.

    Parameters
    ----------
    direction : np.ndarray
        A unit vector in patient coordinates.

    Returns
    -------
    str
        E.g. ``"L"`` along a row of an axial slice, ``"P"`` down its columns.
    """
    letters = [("L", "R"), ("P", "A"), ("H", "F")]
    order = np.argsort(-np.abs(direction))
    out = [letters[i][0 if direction[i] > 0 else 1] for i in order if abs(direction[i]) > 0.25]
    return "".join(out) or letters[int(order[0])][0 if direction[order[0]] > 0 else 1]


def _source_item(source: Dataset, frame: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    purpose = Dataset()  # DCM 121322: "Source image for image processing operation"
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def build_overlay_capture(
    volume: Volume,
    labels: np.ndarray,
    segments: Sequence[SegmentSpec],
    provenance: Provenance,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    summary: dict[str, Any] | None = None,
    window: Window | None = None,
) -> Dataset:
    """Build a Multi-frame True Color Secondary Capture of the segments over the source.

    Parameters
    ----------
    volume : Volume
        The source series (its headers already repaired, as for the SEG).
    labels : np.ndarray
        ``(slices, rows, columns)`` labels in the volume's order: 0 background, ``i``
        segment ``i``.
    segments : Sequence[SegmentSpec]
        Label and colour of each segment, in label order.
    provenance : Provenance
        Model and software: descriptions, the notice, contributing equipment.
    series_uid, sop_uid : str
        UIDs of the new object.
    series_number : int
        Series Number of the new series.
    summary : dict, optional
        The job summary; its measurements label the legend (volume and mean HU per
        segment, or diameter and probability per finding).
    window : Window, optional
        Display window; the lung window for chest CT, else soft tissue, by default.

    Returns
    -------
    Dataset
        The object with its file meta, RGB, one frame per shown slice (see
        :func:`overlay_slices`), in the source's study.
    """
    if labels.shape != volume.shape:
        raise ValueError(f"labels {labels.shape} do not match the volume {volume.shape}")
    first = volume.datasets[0]
    names = [s.label for s in segments]
    window = window or default_window(
        volume.modality, str(first.get("BodyPartExamined", "") or ""), names
    )
    texts = measurement_texts(summary or {}, len(segments))
    entries = [
        LegendEntry(s.label, (int(s.color[0]), int(s.color[1]), int(s.color[2])), t)
        for s, t in zip(segments, texts, strict=True)
    ]
    shown = overlay_slices(labels)
    rgb = render_overlay(
        volume.pixels[shown],
        labels[shown],
        entries,
        window=window,
        clinical_use=provenance.clinical_use,
        lines=[f"AI {provenance.model_name} {provenance.model_version}"],
    )

    ds = hd.base.SOPClass(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        sop_class_uid=SC_CLASS,
        instance_number=1,
        # SC's Modality is the General Series one; "OT" keeps the overlay out of CT
        # hanging protocols and measurement tools that would treat it as CT.
        modality="OT",
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=provenance.series_description("overlay"),
        manufacturer_model_name=provenance.model_name,
        # highdicom annotates str | tuple but takes any sequence (LO 1-n).
        software_versions=provenance.software_versions,  # type: ignore[arg-type]
        device_serial_number="0",
    )
    # Patient and study modules exactly as the source has them (same study in the PACS).
    ds.copy_patient_and_study_information(first)
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet

    # SC Equipment: made on a workstation from other images.
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = provenance.model_name
    ds.SecondaryCaptureDeviceSoftwareVersions = provenance.software_versions
    ds.ContributingEquipmentSequence = [contributing_equipment(provenance)]

    # General Image and General Reference.
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = [
        patient_orientation(volume.row_direction),
        patient_orientation(volume.column_direction),
    ]
    # Image Laterality (or the series' Laterality) is required for a paired body part;
    # keep the source's, and say "U" when it gives none rather than leave it out.
    if first.get("Laterality"):
        ds.Laterality = first.Laterality
    ds.ImageLaterality = first.get("ImageLaterality") or first.get("Laterality") or "U"
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.DerivationDescription = (
        f"Segments of {provenance.model_name} {provenance.model_version} outlined over the "
        f"source, window {window.center:g}/{window.width:g} HU"
    )[:1024]
    if not provenance.clinical_use:
        ds.ImageComments = RESEARCH_NOTICE
    ds.LossyImageCompression = "00"
    multiframe = volume.is_multiframe
    items = []
    for k in shown:
        source, number = volume.source_of(k)
        items.append(_source_item(source, number if multiframe else None))
    # One item per frame, in frame order: frame i + 1 shows the source of item i.
    ds.SourceImageSequence = DicomSequence(items)

    # Image Pixel, Multi-frame, SC Multi-frame Image and SC Multi-frame Vector.
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[1]), int(rgb.shape[2])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = len(shown)
    ds.FrameIncrementPointer = SLICE_LOCATION_VECTOR
    ds.SliceLocationVector = [
        round(float(np.dot(volume.positions[k], volume.normal)), 4) for k in shown
    ]
    ds.PixelSpacing = [round(float(v), 6) for v in volume.pixel_spacing]
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds["PixelData"].VR = "OB"
    return ds
