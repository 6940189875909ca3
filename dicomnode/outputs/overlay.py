"""Burned-in overlays: CT slices with segment contours, a legend and a research notice.

Pure functions on numpy arrays, shared by the Secondary Capture series (for PACS
viewers that cannot show SEG) and by ``dicomnode jobs show --preview``. Nothing here
reads patient data: the only text drawn is what the caller passes (segment labels,
measurements, model names) and the notice.

Speed matters because the overlay is built inside a job: windowing and contours are
vectorised over the whole stack, and the legend and notice, identical on every
slice, are drawn once with Pillow and composited onto all slices with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

NOTICE = "NOT FOR CLINICAL USE"
NOTICE_COLOR = (255, 255, 255)
NOTICE_BACKGROUND = (200, 0, 0)
TEXT_COLOR = (255, 255, 255)
PANEL_ALPHA = 0.7  # legend and notice backgrounds: readable, the anatomy still shows
FILL_ALPHA = 0.2  # a light tint inside segments: visible at a glance, the anatomy still shows


@dataclass(frozen=True)
class Window:
    """A display window: HU ``center - width/2`` is black, ``center + width/2`` white."""

    center: float
    width: float


LUNG_WINDOW = Window(center=-600.0, width=1500.0)
SOFT_TISSUE_WINDOW = Window(center=40.0, width=400.0)
_CHEST_WORDS = ("CHEST", "THORAX", "LUNG")


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: a colour swatch, the segment's label and an optional measurement."""

    label: str
    color: tuple[int, int, int]
    text: str = ""


@dataclass(frozen=True)
class Annotation:
    """The legend and notice layer, the same for every slice of one size.

    Attributes
    ----------
    rgb : np.ndarray
        ``(rows, columns, 3)`` uint8 colours of the layer.
    alpha : np.ndarray
        ``(rows, columns)`` float32 opacity, 0 where the slice shows through.
    legend_box, notice_box : tuple[int, int, int, int] or None
        ``(left, top, right, bottom)`` pixel boxes (right and bottom exclusive) of the
        legend and of the notice; None where nothing is drawn.
    """

    rgb: np.ndarray
    alpha: np.ndarray
    legend_box: tuple[int, int, int, int] | None
    notice_box: tuple[int, int, int, int] | None


def default_window(modality: str, body_part: str = "", labels: Sequence[str] = ()) -> Window:
    """Return the lung window for chest CT, else a soft-tissue window.

    Parameters
    ----------
    modality : str
        The source's Modality.
    body_part : str
        BodyPartExamined, if any.
    labels : Sequence[str]
        Segment labels; a lung or nodule segment marks the study as a chest study
        even when BodyPartExamined is missing (it often is).

    Returns
    -------
    Window
        :data:`LUNG_WINDOW` or :data:`SOFT_TISSUE_WINDOW`.
    """
    words = " ".join([body_part, *labels]).upper()
    chest = any(w in words for w in _CHEST_WORDS) or "NODULE" in words
    return LUNG_WINDOW if modality.upper() == "CT" and chest else SOFT_TISSUE_WINDOW


def windowed(values: np.ndarray, window: Window) -> np.ndarray:
    """Map values (HU) through a display window to 8-bit grey.

    Parameters
    ----------
    values : np.ndarray
        Any shape, e.g. ``(slices, rows, columns)`` HU.
    window : Window
        The display window.

    Returns
    -------
    np.ndarray
        uint8 of the same shape.
    """
    low = window.center - window.width / 2
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(low)) * np.float32(
        255.0 / max(window.width, 1e-6)
    )
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


def _shifted(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Return ``out[..., y, x] = labels[..., y + dy, x + dx]``, 0 outside the image."""
    rows, cols = labels.shape[-2:]
    out = np.zeros_like(labels)
    out[..., max(-dy, 0) : rows - max(dy, 0), max(-dx, 0) : cols - max(dx, 0)] = labels[
        ..., max(dy, 0) : rows - max(-dy, 0), max(dx, 0) : cols - max(-dx, 0)
    ]
    return out


def contour_mask(labels: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Return the boundary pixels of every segment, slice by slice.

    A segment pixel is on the boundary when a pixel within ``thickness`` steps (city-block
    distance, in the slice plane) has another label: ``mask & ~eroded`` for each label at
    once, so two touching segments each keep their own outline. Outside the image counts
    as background, so a segment touching the edge is outlined there too.

    Parameters
    ----------
    labels : np.ndarray
        ``(..., rows, columns)`` integer labels, 0 background.
    thickness : int
        Outline width in pixels (1 or more).

    Returns
    -------
    np.ndarray
        bool of the same shape.
    """
    inner = labels != 0
    same = np.ones(labels.shape, dtype=bool)
    for dy in range(-thickness, thickness + 1):
        for dx in range(-thickness, thickness + 1):
            if (dy or dx) and abs(dy) + abs(dx) <= thickness:
                same &= labels == _shifted(labels, dy, dx)
    return inner & ~same


def default_thickness(rows: int, columns: int) -> int:
    """Return the outline width for an image size: 1 px below 384 px, else 2.

    One pixel of a pale package colour vanishes against the white soft tissue of a
    lung window at 512 px; two stay visible without hiding the edge they mark.
    """
    return 1 if min(rows, columns) < 384 else 2


def colorize(
    grey: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[Sequence[int]],
    *,
    thickness: int | None = None,
    fill_alpha: float = FILL_ALPHA,
) -> np.ndarray:
    """Turn grey slices into RGB with each segment's outline (and optional fill) burned in.

    Parameters
    ----------
    grey : np.ndarray
        ``(..., rows, columns)`` uint8 windowed slices.
    labels : np.ndarray
        Integer labels of the same shape: 0 background, ``i`` segment ``i``.
    colors : Sequence[Sequence[int]]
        RGB colour of segment ``i`` at index ``i - 1``.
    thickness : int, optional
        Outline width; :func:`default_thickness` of the image size by default.
    fill_alpha : float
        Opacity of a tint inside each segment (:data:`FILL_ALPHA` by default); 0 draws
        outlines only.

    Returns
    -------
    np.ndarray
        ``(..., rows, columns, 3)`` uint8.

    Raises
    ------
    ValueError
        If shapes differ or a label has no colour.
    """
    if grey.shape != labels.shape:
        raise ValueError(f"grey {grey.shape} and labels {labels.shape} differ in shape")
    if labels.size and int(labels.max()) > len(colors):
        raise ValueError(f"label {int(labels.max())} has no colour ({len(colors)} given)")
    lut = np.zeros((len(colors) + 1, 3), dtype=np.float32)
    if len(colors):
        lut[1:] = np.asarray(colors, dtype=np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if fill_alpha > 0:
        inside = labels != 0
        blended = rgb[inside] * (1 - fill_alpha) + lut[labels[inside]] * fill_alpha
        rgb[inside] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    width = default_thickness(*labels.shape[-2:]) if thickness is None else thickness
    edge = contour_mask(labels, width)
    rgb[edge] = lut[labels[edge]].astype(np.uint8)
    return rgb


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font scales when FreeType is available; the bitmap
    # fallback (fixed ~11 px) still renders, just smaller.
    return ImageFont.load_default(size=size)


def _text_size(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont
) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return math.ceil(right - min(left, 0)), math.ceil(bottom - min(top, 0))


def legend_font_size(columns: int) -> int:
    """Return the legend's font size in pixels for an image width (13 px at 512)."""
    return max(10, round(columns / 40))


def annotation_layer(
    rows: int,
    columns: int,
    entries: Sequence[LegendEntry],
    *,
    clinical_use: bool,
    lines: Sequence[str] = (),
) -> Annotation:
    """Draw the legend (top left) and the research notice (bottom centre) once.

    Parameters
    ----------
    rows, columns : int
        The slice size.
    entries : Sequence[LegendEntry]
        One swatch and label (and measurement) per segment.
    clinical_use : bool
        False draws "NOT FOR CLINICAL USE" in white on red across the bottom.
    lines : Sequence[str]
        Text lines above the entries, e.g. the model's name and version.

    Returns
    -------
    Annotation
        The layer and where its parts are.
    """
    layer = Image.new("RGBA", (columns, rows), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    texts = [*lines, *(f"{e.label}  {e.text}" if e.text else e.label for e in entries)]
    size = legend_font_size(columns)
    # Shrink to fit a narrow image rather than cut the text off.
    while size > 6 and texts:
        longest = max(_text_size(draw, t, _font(size))[0] for t in texts)
        if longest + 2 * size <= columns:
            break
        size -= 1
    font = _font(size)
    pad = max(2, size // 3)
    swatch = size
    legend_box: tuple[int, int, int, int] | None = None
    if texts:
        widths = [_text_size(draw, t, font)[0] for t in texts]
        line_h = size + pad
        indent = [0] * len(lines) + [swatch + pad] * len(entries)
        width = max(w + i for w, i in zip(widths, indent, strict=True)) + 2 * pad
        height = len(texts) * line_h + pad
        legend_box = (0, 0, min(width, columns), min(height, rows))
        draw.rectangle(
            (0, 0, legend_box[2] - 1, legend_box[3] - 1),
            fill=(0, 0, 0, round(255 * PANEL_ALPHA)),
        )
        for n, text in enumerate(texts):
            y = pad + n * line_h
            x = pad + indent[n]
            if n >= len(lines):
                color = tuple(int(c) for c in entries[n - len(lines)].color)
                draw.rectangle((pad, y, pad + swatch - 1, y + swatch - 1), fill=(*color, 255))
            draw.text((x, y), text, font=font, fill=(*TEXT_COLOR, 255))
    notice_box: tuple[int, int, int, int] | None = None
    if not clinical_use:
        big_size = max(12, round(columns / 22))
        while big_size > 6 and _text_size(draw, NOTICE, _font(big_size))[0] + 2 * pad > columns:
            big_size -= 1
        big = _font(big_size)
        text_w, text_h = _text_size(draw, NOTICE, big)
        box_w, box_h = min(columns, text_w + 2 * pad), min(rows, text_h + 2 * pad)
        left, top = max(0, (columns - box_w) // 2), rows - box_h
        notice_box = (left, top, left + box_w, rows)
        draw.rectangle(
            (left, top, left + box_w - 1, rows - 1),
            fill=(*NOTICE_BACKGROUND, round(255 * PANEL_ALPHA)),
        )
        draw.text((left + pad, top + pad), NOTICE, font=big, fill=(*NOTICE_COLOR, 255))
    pixels = np.asarray(layer)
    return Annotation(
        rgb=pixels[..., :3].copy(),
        alpha=pixels[..., 3].astype(np.float32) / 255.0,
        legend_box=legend_box,
        notice_box=notice_box,
    )


def composite(frames: np.ndarray, annotation: Annotation) -> np.ndarray:
    """Blend an annotation layer onto every frame, in place.

    Parameters
    ----------
    frames : np.ndarray
        ``(..., rows, columns, 3)`` uint8; modified.
    annotation : Annotation
        From :func:`annotation_layer` for the same size.

    Returns
    -------
    np.ndarray
        ``frames``.
    """
    for box in (annotation.legend_box, annotation.notice_box):
        if box is None:
            continue
        left, top, right, bottom = box
        alpha = annotation.alpha[top:bottom, left:right, None]
        under = frames[..., top:bottom, left:right, :].astype(np.float32)
        over = annotation.rgb[top:bottom, left:right].astype(np.float32)
        frames[..., top:bottom, left:right, :] = np.rint(under * (1 - alpha) + over * alpha)
    return frames


def render_overlay(
    values: np.ndarray,
    labels: np.ndarray,
    entries: Sequence[LegendEntry],
    *,
    window: Window,
    clinical_use: bool,
    lines: Sequence[str] = (),
    thickness: int | None = None,
    fill_alpha: float = FILL_ALPHA,
) -> np.ndarray:
    """Render slices with segment outlines, a legend and (for research models) the notice.

    Parameters
    ----------
    values : np.ndarray
        ``(slices, rows, columns)`` HU (or the modality's values).
    labels : np.ndarray
        ``(slices, rows, columns)`` labels: 0 background, ``i`` segment ``i``.
    entries : Sequence[LegendEntry]
        Segment ``i``'s label, colour and measurement at index ``i - 1``.
    window : Window
        Display window, e.g. :data:`LUNG_WINDOW`; see :func:`default_window`.
    clinical_use : bool
        False burns "NOT FOR CLINICAL USE" into every slice.
    lines : Sequence[str]
        Legend lines above the segments (no patient data).
    thickness : int, optional
        Outline width; scaled with the image by default.
    fill_alpha : float
        Opacity of a tint inside segments; 0 draws outlines only.

    Returns
    -------
    np.ndarray
        ``(slices, rows, columns, 3)`` uint8 RGB.
    """
    rgb = colorize(
        windowed(values, window),
        labels,
        [e.color for e in entries],
        thickness=thickness,
        fill_alpha=fill_alpha,
    )
    rows, columns = labels.shape[-2:]
    return composite(
        rgb, annotation_layer(rows, columns, entries, clinical_use=clinical_use, lines=lines)
    )


def measurement_texts(summary: Mapping[str, Any], count: int) -> list[str]:
    """Return one short measurement text per segment from a job's summary.

    Parameters
    ----------
    summary : Mapping[str, Any]
        The job summary the pipeline records: ``segments`` (volume, mean HU) and, for a
        detection model, ``detection.findings`` (diameter, probability), in segment order.
    count : int
        Number of segments.

    Returns
    -------
    list[str]
        E.g. ``"2650.3 mL, mean -845 HU"`` or ``"35 mm, p 0.64"`` (with the change since
        the prior when the job compared, ``"; was 9 mm, VDT 201 d"``); empty where unknown.
    """
    texts = [""] * count
    for i, seg in enumerate(list(summary.get("segments", []))[:count]):
        volume, mean = seg.get("volume_ml"), seg.get("mean")
        if volume is not None:
            texts[i] = f"{volume:.1f} mL" + ("" if mean is None else f", mean {mean:.0f} HU")
    findings = (summary.get("detection") or {}).get("findings", [])
    for finding in findings:
        i = int(finding.get("number", 0)) - 1
        if 0 <= i < count:
            texts[i] = f"{finding['diameter_mm']:.0f} mm, p {finding['probability']:.2f}"
    for nodule in (summary.get("comparison") or {}).get("nodules", []):
        i = int(nodule.get("number") or 0) - 1
        if 0 <= i < count and texts[i]:
            texts[i] += "; " + _change_text(nodule)
    return texts


def _change_text(nodule: Mapping[str, Any]) -> str:
    """Return a nodule's change since the prior, short: ``new`` or ``was 9 mm, VDT 201 d``."""
    if nodule.get("status") != "matched":
        return "new"
    text = f"was {nodule['diameter_mm'][0]:.0f} mm"
    days = nodule.get("doubling_days")
    return text + ("" if days is None else f", VDT {days:.0f} d")


def select_slices(labels: np.ndarray, limit: int) -> list[int]:
    """Pick up to ``limit`` slices to show: each segment's largest, then evenly spaced.

    Every segment (a small nodule too) gets its largest cross-section in; the rest are
    spread evenly over the slices with any segment, or over all slices when none has one.

    Parameters
    ----------
    labels : np.ndarray
        ``(slices, rows, columns)`` labels.
    limit : int
        Most slices to return.

    Returns
    -------
    list[int]
        Sorted slice indices.
    """
    slices = labels.shape[0]
    if slices == 0 or limit <= 0:
        return []
    flat = labels.reshape(slices, -1)
    chosen: set[int] = set()
    for value in np.unique(flat[flat != 0]):
        if len(chosen) >= limit:
            break
        chosen.add(int(np.argmax((flat == value).sum(axis=1))))
    occupied = np.flatnonzero(flat.any(axis=1))
    pool = occupied if occupied.size else np.arange(slices)
    steps = np.linspace(0, pool.size - 1, min(limit, pool.size)).round().astype(int)
    spread = pool[np.unique(steps)]
    for index in spread:
        if len(chosen) >= limit:
            break
        chosen.add(int(index))
    return sorted(chosen)


def montage(
    tiles: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    header: Sequence[str],
    entries: Sequence[LegendEntry],
    clinical_use: bool,
    columns: int = 4,
) -> Image.Image:
    """Lay rendered slices out in a grid under a header of text, legend and notice.

    Parameters
    ----------
    tiles : Sequence[np.ndarray]
        ``(rows, columns, 3)`` uint8 images, all the same size.
    captions : Sequence[str]
        A short caption per tile (e.g. ``"slice 40/133"``).
    header : Sequence[str]
        Lines at the top (key measurements; no patient data).
    entries : Sequence[LegendEntry]
        The legend, drawn under the header.
    clinical_use : bool
        False adds "NOT FOR CLINICAL USE" to the header.
    columns : int
        Tiles per row at most.

    Returns
    -------
    PIL.Image.Image
        RGB image, ``min(columns, len(tiles)) * tile width`` wide.
    """
    if not tiles:
        raise ValueError("no tiles to lay out")
    tile_h, tile_w = tiles[0].shape[:2]
    across = max(1, min(columns, len(tiles)))
    down = math.ceil(len(tiles) / across)
    width = across * tile_w
    size = max(12, round(width / 70))
    font, big = _font(size), _font(round(size * 1.4))
    pad = size // 2
    line_h = size + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    notice_h = _text_size(probe, NOTICE, big)[1] + pad if not clinical_use else 0
    header_h = pad + notice_h + (len(header) + len(entries)) * line_h + pad
    image = Image.new("RGB", (width, header_h + down * tile_h), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    y = pad
    if not clinical_use:
        draw.text((pad, y), NOTICE, font=big, fill=(255, 60, 60))
        y += notice_h
    for line in header:
        draw.text((pad, y), line, font=font, fill=TEXT_COLOR)
        y += line_h
    for entry in entries:
        color = tuple(int(c) for c in entry.color)
        draw.rectangle((pad, y, pad + size - 1, y + size - 1), fill=color)
        text = f"{entry.label}  {entry.text}" if entry.text else entry.label
        draw.text((2 * pad + size, y), text, font=font, fill=TEXT_COLOR)
        y += line_h
    small = _font(max(10, round(tile_w / 22)))
    for n, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        x0, y0 = (n % across) * tile_w, header_h + (n // across) * tile_h
        image.paste(Image.fromarray(tile), (x0, y0))
        draw.text((x0 + 3, y0 + 2), caption, font=small, fill=(255, 255, 0))
    return image
