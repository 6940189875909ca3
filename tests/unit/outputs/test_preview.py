"""The preview montage of a SEG over its source: labels, legend, tiles and notice."""

from __future__ import annotations

import ast
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.config import SegOptions
from dicomnode.imaging import Volume
from dicomnode.imaging.manifest import load_model_spec
from dicomnode.outputs import (
    PALETTE,
    Provenance,
    build_segmentation,
    label_volume,
    preview,
    preview_montage,
    segment_entries,
)
from dicomnode.outputs.preview import COLUMNS, MAX_SLICES, TILE_WIDTH
from tests.conftest import REPO
from tests.factories import ct_series, legacy_enhanced, lung_phantom
from tests.unit.outputs.test_seg_read import files, phantom_labels, volume_of

SPEC = load_model_spec(REPO / "models/lung-unet2d")
NOTICE_RED = (255, 60, 60)  # "NOT FOR CLINICAL USE" in the header


def phantom_volume(slices: int = 14, *, multiframe: bool = False) -> Volume:
    datasets = ct_series(lung_phantom(slices=slices, size=48))
    if multiframe:  # frames stored top to bottom: not the volume's slice order
        datasets = [legacy_enhanced(datasets, frame_order=range(slices - 1, -1, -1))]
    return volume_of(files(datasets))  # through bytes, as the spool's files are read


def make_seg(
    volume: Volume, labels: np.ndarray, *, clinical_use: bool = False
) -> hd.seg.Segmentation:
    """A SEG as the pipeline writes it (empty frames left out), read back from bytes."""
    provenance = Provenance(SPEC.name, SPEC.version, clinical_use=clinical_use)
    seg = build_segmentation(
        volume.datasets,
        labels,
        SPEC.output.segments,
        provenance,
        series_uid=provenance.uid("s", "seg"),
        sop_uid=provenance.uid("i", "seg"),
        series_number=9901,
        frames=volume.frames,
        options=SegOptions(),
    )
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    return hd.seg.segread(BytesIO(buffer.getvalue()))


def count(pixels: np.ndarray, color: tuple[int, ...]) -> int:
    return int((pixels.reshape(-1, 3) == color).all(axis=1).sum())


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
def test_label_volume_is_the_seg_on_the_source_grid(multiframe: bool) -> None:
    volume = phantom_volume(multiframe=multiframe)
    labels = phantom_labels(volume)
    assert set(np.unique(labels)) == {0, 1, 2}
    got = label_volume(make_seg(volume, labels), volume)
    assert got.shape == volume.shape
    # The empty end slices are frames the SEG left out: they come back empty.
    np.testing.assert_array_equal(got, labels)


def test_segment_entries_take_the_segs_colours_and_the_summarys_measurements() -> None:
    volume = phantom_volume()
    seg = make_seg(volume, phantom_labels(volume))
    summary = {
        "segments": [{"volume_ml": 1234.56, "mean": -845.4}, {"volume_ml": 7.0}],
        "detection": {"findings": [{"number": 2, "diameter_mm": 7.4, "probability": 0.876}]},
    }
    entries = segment_entries(seg, summary)
    assert [e.label for e in entries] == [s.label for s in SPEC.output.segments]
    assert [e.color for e in entries] == [tuple(s.color) for s in SPEC.output.segments]
    assert [e.text for e in entries] == ["1234.6 mL, mean -845 HU", "7 mm, p 0.88"]
    assert [e.text for e in segment_entries(seg, {})] == ["", ""]


def test_segment_entries_in_segment_order_with_the_palette_where_no_colour() -> None:
    volume = phantom_volume()
    seg = make_seg(volume, phantom_labels(volume))
    items = list(seg.SegmentSequence)
    for item in items:
        del item.RecommendedDisplayCIELabValue
    seg.SegmentSequence = list(reversed(items))  # segment 2 listed first
    entries = segment_entries(seg, {})
    assert [e.label for e in entries] == [s.label for s in SPEC.output.segments]
    assert [e.color for e in entries] == [tuple(int(c) for c in PALETTE[n]) for n in (0, 1)]


def test_the_montage_shows_the_segmented_slices_up_to_the_limit() -> None:
    volume = phantom_volume(slices=20)
    seg = make_seg(volume, phantom_labels(volume))
    image, shown = preview_montage(seg, volume, {}, ["job 7"])
    assert shown == MAX_SLICES  # of the 17 slices with segments
    assert image.mode == "RGB"
    assert image.width == COLUMNS * TILE_WIDTH  # 48x48 slices: square tiles
    header = image.height - 3 * TILE_WIDTH
    assert header > 0
    pixels = np.asarray(image)
    for segment in SPEC.output.segments:  # legend swatches and outlines
        assert count(pixels, tuple(segment.color)) > 50

    few = phantom_volume(slices=8)
    image, shown = preview_montage(make_seg(few, phantom_labels(few)), few, {}, ["job 7"])
    assert shown == 5  # slices 3 to 7: only those with segments
    assert image.width == COLUMNS * TILE_WIDTH and image.height == header + 2 * TILE_WIDTH


def test_the_montage_marks_a_research_seg_and_grows_with_the_header() -> None:
    volume = phantom_volume()
    labels = phantom_labels(volume)
    research, _ = preview_montage(make_seg(volume, labels), volume, {}, ["job 7"])
    clinical, _ = preview_montage(
        make_seg(volume, labels, clinical_use=True), volume, {}, ["job 7"]
    )
    assert count(np.asarray(research), NOTICE_RED) > 0
    assert count(np.asarray(clinical), NOTICE_RED) == 0
    assert research.height > clinical.height
    longer, _ = preview_montage(
        make_seg(volume, labels, clinical_use=True), volume, {}, ["job 7", "more"]
    )
    assert longer.height > clinical.height


def test_the_preview_module_is_pure() -> None:
    # outputs/ draws what it is given: the database, the spool and the network stay
    # out (the layer contract alone would let it import db/).
    tree = ast.parse(Path(preview.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    ours = {m for m in imported if m.split(".")[0] == "dicomnode"}
    allowed = ("dicomnode.outputs", "dicomnode.imaging", "dicomnode.config", "dicomnode.errors")
    assert ours and all(m.startswith(allowed) for m in ours), sorted(ours)
    assert "sqlalchemy" not in {m.split(".")[0] for m in imported}
