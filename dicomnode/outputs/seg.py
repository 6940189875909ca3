"""DICOM Segmentation objects with highdicom."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from dicomnode.config import SegOptions
from dicomnode.errors import PermanentJobError, UnusableSeg
from dicomnode.imaging import SegmentSpec, Volume, frame_order, is_enhanced
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


def labels_in_source_order(
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    frames: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Return labels in the frame order highdicom expects of the source images.

    For single-frame sources that is the order of ``source_images`` (one slice
    each), which is already the volume's order. A single multi-frame source needs
    its frames in frame-number order, while the volume sorted them along the normal.

    Parameters
    ----------
    source_images : Sequence[Dataset]
        The volume's source headers (:attr:`Volume.datasets`).
    labels : np.ndarray
        ``(slices, rows, columns)`` labels in the volume's slice order.
    frames : Sequence[tuple[int, int]] or None
        The volume's ``(source index, frame number)`` per slice
        (:attr:`Volume.frames`); None to derive them from the source's geometry
        the way the volume did.

    Returns
    -------
    np.ndarray
        ``(frames, rows, columns)`` labels, frame ``i`` on source frame ``i + 1``
        for a multi-frame source; ``labels`` itself for single-frame sources.

    Raises
    ------
    PermanentJobError
        If the sources are several multi-frame instances (one SEG can reference
        the frames of only one), or the labels do not match the sources' frames.
    """
    if not any(is_enhanced(ds) for ds in source_images):
        if len(source_images) != labels.shape[0]:
            raise PermanentJobError(
                f"SEG: {labels.shape[0]} label slices for {len(source_images)} source images"
            )
        return labels
    if len(source_images) > 1:
        # highdicom (and the SEG IOD's common use) references one multi-frame source.
        raise PermanentJobError(
            f"SEG: a series of {len(source_images)} multi-frame instances is not supported; "
            "only one multi-frame instance per series"
        )
    source = source_images[0]
    count = int(source.get("NumberOfFrames", 1) or 1)
    numbers = frame_order(source) if frames is None else [number for _, number in frames]
    if len(numbers) != labels.shape[0] or sorted(numbers) != list(range(1, count + 1)):
        raise PermanentJobError(
            f"SEG: {labels.shape[0]} label slices do not match the {count} frames of "
            f"instance {source.SOPInstanceUID}"
        )
    in_frame_order = np.zeros((count, *labels.shape[1:]), dtype=labels.dtype)
    in_frame_order[np.asarray(numbers) - 1] = labels
    return in_frame_order


TRANSFER_SYNTAXES = {
    "none": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpeg-ls": JPEGLSLossless,
    "rle": RLELossless,
}


def segment_tracking_uid(provenance: Provenance, seg_series_uid: str, number: int, key: str) -> str:
    """Return the Tracking UID of segment ``number`` of a SEG series.

    Parameters
    ----------
    provenance : Provenance
        The UID root.
    seg_series_uid : str
        The SEG's Series Instance UID.
    number : int
        The segment number.
    key : str
        Empty for anatomy (the same structure in every run); the input's digest for
        findings, since "Nodule 1" of one run need not be "Nodule 1" of the next.

    Returns
    -------
    str
        The UID.
    """
    return provenance.uid(seg_series_uid, "segment", str(number), key)


def build_segmentation(
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    segments: Sequence[SegmentSpec],
    provenance: Provenance,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    frames: Sequence[tuple[int, int]] | None = None,
    options: SegOptions | None = None,
    tracking_key: str = "",
    tracking_uids: Mapping[int, str] | None = None,
) -> hd.seg.Segmentation:
    """Build a DICOM SEG (BINARY by default) of a label map on the source images' grid.

    Parameters
    ----------
    source_images : Sequence[Dataset]
        The source instances: :attr:`Volume.datasets`. Single-frame instances
        are in the order of ``labels``' first axis; a single enhanced multi-frame
        instance holds every slice as one of its frames.
    labels : np.ndarray
        ``(slices, rows, columns)`` integer labels in the volume's slice order:
        0 background, ``i`` segment ``i``.
    segments : Sequence[SegmentSpec]
        Label, codes and colour of each segment, in label order.
    provenance : Provenance
        Model and software, for algorithm identification and descriptions.
    series_uid, sop_uid : str
        UIDs of the new object.
    series_number : int
        Series Number of the new series.
    frames : Sequence[tuple[int, int]] or None
        :attr:`Volume.frames`, which maps slices to source frames; derived from
        the source's geometry when not given.
    options : SegOptions, optional
        The route's encoding: BINARY or LABELMAP, lossless compression, and whether
        empty frames are kept; BINARY, uncompressed, empty frames left out by default.
    tracking_key : str
        Part of every segment's Tracking UID besides the series: empty for anatomy,
        which is the same structure in every run; the input's digest for findings,
        since "Nodule 1" of one run need not be "Nodule 1" of the next.
    tracking_uids : Mapping[int, str], optional
        Segment number -> the Tracking UID it keeps from an earlier study (a nodule
        matched with the prior's); the others get a new one as above.

    Returns
    -------
    highdicom.seg.Segmentation
        The object; frames reference their source instances (and, for a
        multi-frame source, their source frame numbers).

    Raises
    ------
    PermanentJobError
        If the slices cannot be mapped onto the source frames
        (see :func:`labels_in_source_order`).
    """
    options = options or SegOptions()
    pixel_array = labels_in_source_order(source_images, labels, frames)
    algorithm = algorithm_identification(provenance)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=seg.label,
            segmented_property_category=coded(seg.category),
            segmented_property_type=coded(seg.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=(tracking_uids or {}).get(number)
            or segment_tracking_uid(provenance, series_uid, number, tracking_key),
            tracking_id=seg.label,
            display_color=hd.color.CIELabColor.from_rgb(*seg.color),
        )
        for number, seg in enumerate(segments, start=1)
    ]
    content_label = re.sub(r"[^A-Z0-9_ ]", "_", provenance.model_name.upper())[:16]
    return hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=pixel_array,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP
            if options.type == "labelmap"
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        transfer_syntax_uid=TRANSFER_SYNTAXES[options.compression],
        # Left out, an empty frame is simply absent; some viewers (and PACS tiling
        # logic) expect one frame per source image, which empty_frames restores.
        omit_empty_frames=not options.empty_frames,
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


def read_labels(path: Path, volume: Volume, segments: Sequence[str]) -> np.ndarray:
    """Read back the label volume a SEG of :func:`build_segmentation` was made from.

    Every encoding a route can choose reads back exactly: BINARY or LABELMAP, any
    lossless compression, with or without empty frames (a frame left out is empty).

    Parameters
    ----------
    path : Path
        The SEG file.
    volume : Volume
        The series the labels are wanted on.
    segments : Sequence[str]
        The labels of the segments the SEG must hold, in segment-number order.

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns)`` uint8 labels in the volume's slice order: 0
        background, ``i`` the segment ``segments[i - 1]``.

    Raises
    ------
    UnusableSeg
        If the file is gone or unreadable, or the SEG is not of this volume's grid
        (another series, other source instances, another matrix) or holds other segments.
    """
    try:
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path), copy=False)
    except FileNotFoundError:
        raise UnusableSeg("the SEG file is gone") from None
    except Exception as exc:  # pydicom and highdicom raise many kinds on a bad file
        raise UnusableSeg(f"the SEG does not read ({type(exc).__name__})") from None

    # A LABELMAP SEG describes its background as segment 0: label 0 here too.
    found = [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence]
    found = [(number, label) for number, label in found if number != 0]
    if found != list(enumerate(segments, start=1)):
        raise UnusableSeg(f"the SEG holds {len(found)} other segment(s)")
    if (int(seg.Rows), int(seg.Columns)) != volume.shape[1:]:
        raise UnusableSeg(
            f"the SEG is {seg.Rows}x{seg.Columns}, the series {volume.shape[1]}x{volume.shape[2]}"
        )
    referenced = seg.get("ReferencedSeriesSequence") or []
    if len(referenced) != 1 or referenced[0].SeriesInstanceUID != volume.datasets[0].get(
        "SeriesInstanceUID"
    ):
        raise UnusableSeg("the SEG references another series")
    sources = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    # Every source image is referenced, also one whose frames were left out as empty.
    if {str(i.ReferencedSOPInstanceUID) for i in referenced[0].ReferencedInstanceSequence} != set(
        sources
    ):
        raise UnusableSeg("the SEG references other source instances than the series holds")

    try:
        if volume.is_multiframe:
            if len(sources) != 1:
                raise UnusableSeg("a SEG references the frames of one multi-frame instance only")
            pixels = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=sources[0],
                source_frame_numbers=[number for _, number in volume.frames],
                combine_segments=True,
                assert_missing_frames_are_empty=True,
            )
        else:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=sources,
                combine_segments=True,
                assert_missing_frames_are_empty=True,
            )
    except UnusableSeg:
        raise
    except Exception as exc:  # overlapping segments, frames that do not decode, ...
        raise UnusableSeg(f"the SEG's frames do not decode ({type(exc).__name__})") from None
    labels = np.asarray(pixels)
    if labels.shape != volume.shape:
        raise UnusableSeg(f"the SEG decodes to {labels.shape}, the series is {volume.shape}")
    return labels.astype(np.uint8, copy=False)
