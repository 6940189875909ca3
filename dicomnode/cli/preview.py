"""``dicomnode jobs show ID --preview out.png``: a PNG montage of a job's SEG over its source.

For an admin without a viewer at hand: up to 12 slices with the segments outlined, a
legend and the key measurements of the job's summary. It reads what the job left in
the spool, the SEG (through highdicom) and the source instances, and draws it with
:mod:`dicomnode.outputs.overlay`; no patient data goes into the image.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image

from dicomnode.cli.database import read
from dicomnode.cli.job_output import print_job
from dicomnode.cli.jobs import show_job
from dicomnode.config import Settings
from dicomnode.db import JobDetail, PreviewSource, queries
from dicomnode.errors import PreviewError
from dicomnode.imaging import Volume, load_series
from dicomnode.outputs import (
    PALETTE,
    RESEARCH_NOTICE,
    LegendEntry,
    colorize,
    default_window,
    measurement_texts,
    montage,
    select_slices,
    windowed,
)
from dicomnode.store import Spool

MAX_SLICES = 12
TILE_WIDTH = 256
COLUMNS = 4


def check_target(path: Path) -> None:
    """Refuse a PNG path that cannot be written, before any work is done.

    Parameters
    ----------
    path : Path
        Where the PNG is to go.

    Raises
    ------
    PreviewError
        If its folder is missing or not writable, or the path is a folder.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise PreviewError(f"cannot write the preview to {path}: it is a directory")
    if not folder.is_dir():
        raise PreviewError(f"cannot write the preview to {path}: no directory {folder}")
    if not os.access(folder, os.W_OK):
        raise PreviewError(f"cannot write the preview to {path}: {folder} is not writable")


def seg_path(source: PreviewSource) -> str:
    """Return the spool path of the job's SEG output.

    Parameters
    ----------
    source : PreviewSource
        The job and what a preview of it reads.

    Returns
    -------
    str
        The path of the newest SEG of the job, relative to the spool.

    Raises
    ------
    PreviewError
        If the job has none (not run yet, or nothing was segmented).
    """
    if source.seg_path is None:
        job = source.detail.job
        raise PreviewError(
            f"job {job.id} has no SEG output yet (state {job.state}); nothing to preview"
        )
    return source.seg_path


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


def segment_entries(seg: hd.seg.Segmentation, summary: dict[str, Any]) -> list[LegendEntry]:
    """Return the legend of a SEG: each segment's label, display colour and measurement.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The SEG.
    summary : dict
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


def headline(detail: JobDetail) -> list[str]:
    """Return the header lines: the job and its key result (no patient data)."""
    job, summary = detail.job, detail.summary
    lines = [f"job {job.id}  {job.model} {job.model_version}  ({job.state})"]
    detection = summary.get("detection")
    if detection is not None:
        found = len(detection.get("findings", []))
        best = detection.get("best_probability")
        lines.append(
            f"{found} finding(s) of {detection.get('candidates', '?')} candidates"
            + ("" if best is None else f", best probability {best:.2f}")
        )
    elif "total_volume_ml" in summary:
        lines.append(f"total segment volume {summary['total_volume_ml']:.1f} mL")
    return lines


def render_preview(spool: Spool, source: PreviewSource) -> tuple[Image.Image, int]:
    """Draw the montage of a job's SEG over its source series.

    Parameters
    ----------
    spool : Spool
        Where the SEG and the source instances lie.
    source : PreviewSource
        The job, its SEG (:func:`seg_path`) and its source instances.

    Returns
    -------
    tuple[PIL.Image.Image, int]
        The montage and how many slices it shows.

    Raises
    ------
    PreviewError
        If the SEG or the source images are gone from the spool.
    """
    job = source.detail.job
    paths = [spool.absolute(p) for p in source.instance_paths]
    seg_file = spool.absolute(seg_path(source))
    missing = [p for p in [seg_file, *paths] if not p.is_file()]
    if missing or not paths:
        raise PreviewError(
            f"job {job.id}: {len(missing)} of its files are no longer in the spool"
            if missing
            else f"job {job.id}: its series has no instances left"
        )
    volume = load_series(paths)
    seg = hd.seg.segread(seg_file)
    labels = label_volume(seg, volume)
    entries = segment_entries(seg, source.detail.summary)
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
        header=headline(source.detail),
        entries=entries,
        clinical_use=not research,
        columns=COLUMNS,
    )
    return image, len(shown)


def show_job_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``dicomnode jobs show``, writing the ``--preview`` PNG when asked.

    Parameters
    ----------
    settings : Settings
        The database and the spool.
    args : argparse.Namespace
        ``id``, ``json`` and ``preview`` (a path or None).

    Returns
    -------
    int
        Exit code 0; an unknown job, a job without a SEG or an unwritable path raise a
        one-line error (exit code 1).
    """
    target: Path | None = getattr(args, "preview", None)
    if target is None:
        return show_job(settings, args)
    phi = bool(getattr(args, "show_phi", False))
    source = read(settings, queries.preview_source, args.id, show_phi=phi)
    # Everything that can be refused is refused before anything is printed.
    check_target(target)
    seg_path(source)
    code = print_job(source.detail, args)
    image, count = render_preview(Spool(settings.storage.path, create=False), source)
    try:
        image.save(target, format="PNG")
    except OSError as exc:
        raise PreviewError(f"cannot write the preview to {target}: {exc.strerror or exc}") from None
    message = f"preview       {target} ({count} slices, {image.width}x{image.height})"
    if args.json:  # stdout holds the JSON record alone
        print(message, file=sys.stderr)
    else:
        print(message)
    return code
