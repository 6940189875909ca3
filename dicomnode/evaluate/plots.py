"""PNG plots for ``dicomnode evaluate --plots``: ROC, FROC, Dice bars, overlay montages.

matplotlib is an optional extra (``pip install 'dicomnode[evaluate]'``). Figures are
drawn on the Agg canvas directly (``matplotlib.figure.Figure``), never through pyplot,
so no display, backend switch or global figure state is involved. Sizes are fixed in
inches at :data:`DPI`, so a PNG's pixel size is known in advance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import EvaluationError
from dicomnode.evaluate.scores import roc_auc, roc_curve

DPI = 100
OURS_COLOUR = "#ff3b30"
REFERENCE_COLOUR = "#34c759"


def require_matplotlib() -> None:
    """Raise a one-line :class:`EvaluationError` if matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvaluationError(
            "--plots needs matplotlib: pip install 'dicomnode[evaluate]'"
        ) from None


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")


def plot_roc(
    labels: Sequence[bool], scores: Sequence[float], path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the candidate-level ROC curve (600 x 600 px).

    Parameters
    ----------
    labels : sequence of bool
        Per candidate: a true finding; both classes must occur.
    scores : sequence of float
        Per candidate: its probability.
    path : Path
        PNG to write.

    Returns
    -------
    tuple of np.ndarray
        ``(fpr, tpr)`` as drawn (those of :func:`metrics.roc_curve`).
    """
    fpr, tpr = roc_curve(labels, scores)
    fig = _figure(6, 6)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, drawstyle="steps-post", color=OURS_COLOUR, marker=".")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="false positive rate (candidates)",
        ylabel="true positive rate",
        title=f"ROC, candidate level (AUC {roc_auc(labels, scores):.3f})",
    )
    ax.grid(alpha=0.3)
    _save(fig, path)
    return fpr, tpr


def plot_froc(
    fp_per_scan: np.ndarray,
    sensitivity: np.ndarray,
    path: Path,
    rates: Sequence[float] = (),
    at_rates: Sequence[float] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the FROC curve on a log FP axis (700 x 500 px).

    Parameters
    ----------
    fp_per_scan, sensitivity : np.ndarray
        The curve's points, from :attr:`DetectionReport.froc`.
    path : Path
        PNG to write.
    rates, at_rates : sequence of float
        CPM rates and the sensitivity at each, marked on the curve.

    Returns
    -------
    tuple of np.ndarray
        The points drawn.
    """
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    # A log axis cannot show 0 FP/scan; such points sit at the left edge.
    floor = min(rates) / 2 if rates else 0.01
    shown = np.maximum(fp_per_scan, floor)
    right = max(8.0, float(shown.max()) if shown.size else 8.0)
    # The last sensitivity holds for any higher FP rate: draw it to the right edge.
    ax.plot(
        np.append(shown, right), np.append(sensitivity, sensitivity[-1:]),
        drawstyle="steps-post", color=OURS_COLOUR,
    )  # fmt: skip
    if rates:
        ax.plot(rates, at_rates, "o", color="black", label="CPM points")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set(
        xlim=(floor, right),
        ylim=(0, 1.02),
        xlabel="mean false positives per scan",
        ylabel="sensitivity",
        title="FROC",
    )
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
    return fp_per_scan, sensitivity


def plot_dice(names: Sequence[str], values: Sequence[float], path: Path) -> None:
    """Draw one bar per case (and segment) with its Dice (height 400 px).

    Parameters
    ----------
    names : sequence of str
        Bar labels.
    values : sequence of float
        Dice per bar.
    path : Path
        PNG to write; width 600 px, plus 40 px per bar beyond ten.
    """
    fig = _figure(6 + 0.4 * max(0, len(names) - 10), 4)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color=OURS_COLOUR)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylim=(0, 1), ylabel="Dice", title="Dice per case")
    ax.grid(alpha=0.3, axis="y")
    fig.subplots_adjust(bottom=0.35)
    _save(fig, path)


def overlay_slices(ours: np.ndarray, reference: np.ndarray, tiles: int = 12) -> list[int]:
    """Return up to ``tiles`` slice indices, evenly spread, where either mask is non-empty."""
    hit = np.flatnonzero(np.any(ours, axis=(1, 2)) | np.any(reference, axis=(1, 2)))
    if hit.size <= tiles:
        return [int(k) for k in hit]
    return [int(hit[i]) for i in np.linspace(0, hit.size - 1, tiles).round().astype(int)]


def plot_overlay(
    ours: np.ndarray,
    reference: np.ndarray,
    path: Path,
    images: dict[int, np.ndarray] | None = None,
    title: str = "",
    tiles: int = 12,
) -> list[int]:
    """Draw a montage of slices with the reference and our contours (300 px per tile).

    Parameters
    ----------
    ours, reference : np.ndarray
        ``(slices, rows, columns)`` masks.
    path : Path
        PNG to write; 4 tiles a row.
    images : dict, optional
        Source pixels (HU) by slice index, drawn under the contours; black otherwise.
    title : str
        Figure title.
    tiles : int
        At most this many slices.

    Returns
    -------
    list[int]
        The slice indices drawn (empty, and no file, if both masks are empty).
    """
    chosen = overlay_slices(ours, reference, tiles)
    if not chosen:
        return chosen
    # Crop every tile to where the masks are (plus a margin): a small nodule is a few
    # pixels of a 512 x 512 slice.
    either = np.any(ours[chosen] | reference[chosen], axis=0)
    found = np.argwhere(either)
    margin = max(16, int(0.25 * (found.max(axis=0) - found.min(axis=0)).max()))
    r0, c0 = np.maximum(found.min(axis=0) - margin, 0)
    r1, c1 = found.max(axis=0) + margin + 1
    window = (slice(int(r0), int(r1)), slice(int(c0), int(c1)))
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig = _figure(3 * columns, 3 * rows)
    for n, k in enumerate(chosen):
        ax = fig.add_subplot(rows, columns, n + 1)
        background = (images or {}).get(k)
        if background is None:
            background = np.zeros(ours.shape[1:])
        ax.imshow(background[window], cmap="gray", vmin=-1000, vmax=400, interpolation="nearest")
        # Ours dashed over the reference's solid line: where they agree both still show.
        for mask, colour, style in (
            (reference[k][window], REFERENCE_COLOUR, "solid"),
            (ours[k][window], OURS_COLOUR, "dashed"),
        ):
            if mask.any() and not mask.all():
                ax.contour(
                    mask.astype(float), levels=[0.5], colors=colour, linewidths=1.0,
                    linestyles=style,
                )  # fmt: skip
        ax.set_title(f"slice {k + 1}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{title}  (green: reference, red dashed: ours)", fontsize=9)
    _save(fig, path)
    return chosen
