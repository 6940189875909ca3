"""The preview of a job: a PNG montage of its SEG over the source series.

For an admin without a viewer at hand: up to 12 slices with the segments outlined, a
legend and the key measurements of the job's summary, drawn with
:mod:`dicomnode.outputs.overlay`. A SEG dataset, its source volume and the job summary
in, an image out; finding the files is :mod:`dicomnode.pipeline.preview`'s work. No
patient data goes into the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image

from dicomnode.imaging import Volume
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
from dicomnode.outputs.provenance import RESEARCH_NOTICE

MAX_SLICES = 12
TILE_WIDTH = 256
COLUMNS = 4


def label_volume(seg: hd.seg.Segmentation, volume: Volume) -> np.ndarray:
    """Return the SEG's segments as one label volume on the source grid.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The job's SEG.
    volume : Volume
        Its source series.

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns)`` segment numbers in the volume's slice order, 0 where
        no segment is (frames the SEG left out are empty).
    """
    if volume.is_multiframe:
        source = volume.datasets[0]
        array = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=str(source.SOPInstanceUID),
            source_frame_numbers=[number for _, number in volume.frames],
            combine_segments=True,
            skip_overlap_checks=True,  # overlaps: the higher segment number shows
            assert_missing_frames_are_empty=True,
        )
    else:
        array = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(d.SOPInstanceUID) for d in volume.datasets],
            combine_segments=True,
            skip_overlap_checks=True,
            assert_missing_frames_are_empty=True,
        )
    return np.asarray(array).reshape(volume.shape)


def segment_entries(seg: hd.seg.Segmentation, summary: Mapping[str, Any]) -> list[LegendEntry]:
    """Return the legend of a SEG: each segment's label, display colour and measurement.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The SEG.
    summary : Mapping[str, Any]
        The job summary, for the measurements.

    Returns
    -------
    list[LegendEntry]
        In segment-number order (segment ``i`` at index ``i - 1``).
    """
    items = sorted(seg.SegmentSequence, key=lambda item: int(item.SegmentNumber))
    texts = measurement_texts(summary, len(items))
    entries = []
    for n, item in enumerate(items):
        color = tuple(PALETTE[n % len(PALETTE)])
        if "RecommendedDisplayCIELabValue" in item:
            lab = [int(v) for v in item.RecommendedDisplayCIELabValue]
            color = hd.color.CIELabColor.from_dicom_value(lab).to_rgb(clip=True)
        rgb = (int(color[0]), int(color[1]), int(color[2]))
        entries.append(LegendEntry(str(item.SegmentLabel), rgb, texts[n]))
    return entries


def preview_montage(
    seg: hd.seg.Segmentation,
    volume: Volume,
    summary: Mapping[str, Any],
    header: Sequence[str],
) -> tuple[Image.Image, int]:
    """Draw the montage of a SEG over its source series.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The SEG.
    volume : Volume
        Its source series.
    summary : Mapping[str, Any]
        The job summary, for the legend's measurements.
    header : Sequence[str]
        The lines above the legend (the job and its key result).

    Returns
    -------
    tuple[PIL.Image.Image, int]
        The montage (:data:`COLUMNS` tiles of :data:`TILE_WIDTH` pixels across) and how
        many slices it shows (at most :data:`MAX_SLICES`).
    """
    labels = label_volume(seg, volume)
    entries = segment_entries(seg, summary)
    window = default_window(
        volume.modality,
        str(volume.datasets[0].get("BodyPartExamined", "") or ""),
        [e.label for e in entries],
    )
    shown = select_slices(labels, MAX_SLICES)
    rows, cols = volume.shape[1:]
    size = (TILE_WIDTH, max(1, round(rows * TILE_WIDTH / cols)))
    tiles = []
    for k in shown:
        # Scale first, then outline: a crisp outline at the tile's own resolution.
        grey = Image.fromarray(windowed(volume.pixels[k], window)).resize(
            size, Image.Resampling.BILINEAR
        )
        small = Image.fromarray(labels[k].astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
        tiles.append(colorize(np.asarray(grey), np.asarray(small), [e.color for e in entries]))
    research = seg.get("ContentDescription") == RESEARCH_NOTICE or "NOT FOR CLINICAL USE" in str(
        seg.get("SeriesDescription", "")
    )
    image = montage(
        tiles,
        [f"slice {k + 1}/{volume.shape[0]}" for k in shown],
        header=header,
        entries=entries,
        clinical_use=not research,
        columns=COLUMNS,
    )
    return image, len(shown)
