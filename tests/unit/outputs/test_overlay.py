"""Overlay rendering: windowing, outlines on the exact boundary pixels, legend and notice."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.outputs import (
    LegendEntry,
    colorize,
    default_window,
    measurement_texts,
    montage,
    select_slices,
    windowed,
)
from dicomnode.outputs.overlay import (
    LUNG_WINDOW,
    NOTICE_COLOR,
    SOFT_TISSUE_WINDOW,
    Window,
    annotation_layer,
    contour_mask,
    render_overlay,
)

GREEN, ORANGE = (0, 220, 0), (255, 110, 0)
ENTRIES = [LegendEntry("Left lung", GREEN, "1.2 mL"), LegendEntry("Nodule 1", ORANGE)]


def squares(size: int = 256, slices: int = 2) -> np.ndarray:
    labels = np.zeros((slices, size, size), np.uint8)
    labels[:, 80:140, 60:120] = 1
    labels[:, 90:110, 120:150] = 2  # touches segment 1 along column 119/120
    return labels


def test_windowing_maps_the_window_to_0_255() -> None:
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0], np.float32)
    out = windowed(hu, LUNG_WINDOW)
    assert out.dtype == np.uint8
    assert out[0] == 0 and out[1] == 0 and out[3] == 255 and out[4] == 255
    assert abs(int(out[2]) - 127) <= 1


def test_chest_ct_gets_the_lung_window() -> None:
    assert default_window("CT", "CHEST") == LUNG_WINDOW
    assert default_window("CT", "", ["Left lung"]) == LUNG_WINDOW
    assert default_window("CT", "", ["Nodule 1"]) == LUNG_WINDOW
    assert default_window("CT", "ABDOMEN", ["Liver"]) == SOFT_TISSUE_WINDOW
    assert default_window("MR", "CHEST") == SOFT_TISSUE_WINDOW


def test_contour_is_the_mask_minus_its_erosion() -> None:
    labels = np.zeros((1, 32, 32), np.uint8)
    labels[0, 5:15, 8:20] = 3
    edge = contour_mask(labels, 1)[0]
    expected = np.zeros((32, 32), bool)
    expected[5:15, 8:20] = True
    expected[6:14, 9:19] = False
    np.testing.assert_array_equal(edge, expected)
    thick = contour_mask(labels, 2)[0]
    assert thick[5, 8:20].all() and thick[6, 9:19].all() and not thick[7:13, 10:18].any()


def test_touching_segments_each_keep_their_outline_and_image_edges_count() -> None:
    labels = squares(256, 1)
    edge = contour_mask(labels, 1)[0]
    assert edge[100, 119] and edge[100, 120]  # both sides of the shared border
    assert not edge[100, 118] and not edge[100, 121]
    corner = np.zeros((1, 8, 8), np.uint8)
    corner[0, :3, :3] = 1
    assert contour_mask(corner, 1)[0, 0, 0]  # outside the image is background


def test_outlines_are_drawn_exactly_on_boundary_pixels() -> None:
    labels = squares()
    grey = np.full(labels.shape, 100, np.uint8)
    rgb = colorize(grey, labels, [GREEN, ORANGE], thickness=1, fill_alpha=0.0)
    assert rgb.shape == (*labels.shape, 3)
    edge = contour_mask(labels, 1)
    assert (rgb[edge & (labels == 1)] == GREEN).all()
    assert (rgb[edge & (labels == 2)] == ORANGE).all()
    assert (rgb[~edge] == 100).all()  # outline only: everything else is the grey slice
    assert tuple(rgb[0, 80, 60]) == GREEN and tuple(rgb[0, 139, 100]) == GREEN
    assert tuple(rgb[0, 90, 149]) == ORANGE
    assert tuple(rgb[0, 100, 100]) == (100, 100, 100)  # inside, not filled
    assert tuple(rgb[0, 10, 10]) == (100, 100, 100)  # background
    filled = colorize(grey, labels, [GREEN, ORANGE], thickness=1, fill_alpha=0.5)
    assert tuple(filled[0, 100, 100]) == (50, 160, 50)
    assert tuple(filled[0, 80, 60]) == GREEN


def test_a_label_without_a_colour_is_refused() -> None:
    with pytest.raises(ValueError, match="no colour"):
        colorize(np.zeros((1, 4, 4), np.uint8), np.full((1, 4, 4), 3, np.uint8), [GREEN])


def colours_in(rgb: np.ndarray, box: tuple[int, int, int, int]) -> set[tuple[int, ...]]:
    left, top, right, bottom = box
    return {tuple(int(c) for c in px) for px in rgb[top:bottom, left:right].reshape(-1, 3)}


def test_legend_shows_each_segment_colour_and_the_notice_is_burned_in() -> None:
    labels = squares()
    hu = np.full(labels.shape, -2000.0, np.float32)  # black under the legend and notice
    rgb = render_overlay(hu, labels, ENTRIES, window=LUNG_WINDOW, clinical_use=False)
    layer = annotation_layer(256, 256, ENTRIES, clinical_use=False)
    assert layer.legend_box is not None and layer.notice_box is not None
    for frame in rgb:
        legend = colours_in(frame, layer.legend_box)
        assert GREEN in legend and ORANGE in legend  # the swatches
        assert any(min(c) > 150 for c in legend)  # the labels' white (antialiased) text
        left, top, right, bottom = layer.notice_box
        notice = frame[top:bottom, left:right].astype(int)
        text = (np.abs(notice - NOTICE_COLOR).max(axis=-1) < 80).sum()
        assert text > 100  # "NOT FOR CLINICAL USE" in white on red
        assert bottom == 256 and (right - left) < 256
    # The slice outside the legend and notice is untouched by them.
    plain = colorize(windowed(hu, LUNG_WINDOW), labels, [GREEN, ORANGE])
    np.testing.assert_array_equal(rgb[:, 150:200, 100:200], plain[:, 150:200, 100:200])


def test_no_notice_for_a_clinical_model() -> None:
    labels = squares()
    hu = np.full(labels.shape, -2000.0, np.float32)
    rgb = render_overlay(hu, labels, ENTRIES, window=LUNG_WINDOW, clinical_use=True)
    research = annotation_layer(256, 256, ENTRIES, clinical_use=False)
    assert annotation_layer(256, 256, ENTRIES, clinical_use=True).notice_box is None
    assert research.notice_box is not None
    left, top, right, bottom = research.notice_box
    assert not rgb[:, top:bottom, left:right].any()  # black: nothing burned in


def test_legend_font_shrinks_to_fit_a_small_image() -> None:
    layer = annotation_layer(64, 64, ENTRIES, clinical_use=False, lines=["AI model 1.0"])
    assert layer.legend_box is not None and layer.legend_box[2] <= 64
    assert layer.notice_box is not None and layer.notice_box[2] <= 64


def test_measurement_texts_for_segments_and_findings() -> None:
    summary = {
        "segments": [
            {"label": "Nodule 1", "volume_ml": 22.41, "mean": -50.2},
            {"label": "Nodule 2", "volume_ml": 0.0, "mean": None},
        ],
        "detection": {"findings": [{"number": 2, "diameter_mm": 6.4, "probability": 0.713}]},
    }
    assert measurement_texts(summary, 3) == ["22.4 mL, mean -50 HU", "6 mm, p 0.71", ""]
    assert measurement_texts({}, 2) == ["", ""]


def test_measurement_texts_give_the_change_since_the_prior() -> None:
    findings = [{"number": n, "diameter_mm": d, "probability": 0.9} for n, d in ((1, 13), (2, 6))]
    summary = {
        "detection": {"findings": findings},
        "comparison": {"nodules": [
            {"number": 1, "status": "matched", "diameter_mm": [9.0, 13.0], "doubling_days": 201},
            {"number": 2, "status": "new", "diameter_mm": [None, 6.0], "doubling_days": None},
            {"number": None, "status": "no longer seen", "diameter_mm": [7.0, None]},
        ]},
    }  # fmt: skip
    assert measurement_texts(summary, 2) == [
        "13 mm, p 0.90; was 9 mm, VDT 201 d",
        "6 mm, p 0.90; new",
    ]


def test_slice_selection_keeps_every_segment_and_spreads_the_rest() -> None:
    labels = np.zeros((100, 8, 8), np.uint8)
    labels[10:90, 2:6, 2:6] = 1
    labels[47, 1, 1] = 2  # a one-pixel finding on one slice
    chosen = select_slices(labels, 12)
    assert len(chosen) == 12 and 47 in chosen and chosen == sorted(chosen)
    assert all(10 <= k < 90 for k in chosen)
    assert select_slices(np.zeros((5, 4, 4), np.uint8), 12) == [0, 1, 2, 3, 4]


def test_montage_grid_size() -> None:
    tiles = [np.zeros((100, 128, 3), np.uint8)] * 6
    image = montage(
        tiles, [f"slice {i}" for i in range(6)], header=["job 1"], entries=ENTRIES,
        clinical_use=False, columns=4,
    )  # fmt: skip
    assert image.mode == "RGB" and image.width == 4 * 128
    assert image.height > 2 * 100  # two rows of tiles under the header


def test_windows_are_parameters() -> None:
    hu = np.array([[[40.0]]], np.float32)
    assert windowed(hu, Window(40, 400))[0, 0, 0] in (127, 128)
