"""PNG plots: sizes, the ROC data drawn, and the one-line error without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.cli.main import main
from dicomnode.errors import EvaluationError
from dicomnode.evaluate import plots
from dicomnode.evaluate.scores import roc_curve


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_roc_plot_draws_the_roc_curve(tmp_path: Path) -> None:
    labels = [True, False, True, False, False, True]
    scores = [0.9, 0.8, 0.7, 0.7, 0.2, 0.1]
    fpr, tpr = plots.plot_roc(labels, scores, tmp_path / "roc.png")
    want_fpr, want_tpr = roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(tpr, want_tpr)
    assert size(tmp_path / "roc.png") == (600, 600)


def test_froc_dice_and_overlay_sizes(tmp_path: Path) -> None:
    fps, sens = np.array([0.0, 0.0, 0.5, 2.0]), np.array([0.0, 0.5, 0.5, 1.0])
    drawn = plots.plot_froc(fps, sens, tmp_path / "froc.png", (0.125, 8.0), (0.5, 1.0))
    assert drawn[0] is fps and size(tmp_path / "froc.png") == (700, 500)
    plots.plot_dice(["a", "b"], [0.5, 0.9], tmp_path / "dice.png")
    assert size(tmp_path / "dice.png") == (600, 400)
    plots.plot_dice([str(i) for i in range(15)], [0.5] * 15, tmp_path / "many.png")
    assert size(tmp_path / "many.png") == (800, 400)  # 40 px a bar beyond ten
    ours = np.zeros((30, 64, 64), bool)
    reference = np.zeros_like(ours)
    ours[2:22, 20:40, 20:40] = True
    reference[5:25, 22:42, 20:40] = True
    images = {k: np.full((64, 64), -500.0) for k in range(30)}
    chosen = plots.plot_overlay(ours, reference, tmp_path / "overlay.png", images, "case")
    assert len(chosen) == 12 and chosen[0] == 2 and chosen[-1] == 24  # evenly over 2..24
    assert size(tmp_path / "overlay.png") == (1200, 900)
    few = plots.plot_overlay(ours[:4], reference[:4], tmp_path / "few.png")
    assert few == [2, 3] and size(tmp_path / "few.png") == (600, 300)
    assert plots.plot_overlay(ours[:1], reference[:1], tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_without_matplotlib_plots_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(EvaluationError, match=r"pip install 'dicomnode\[evaluate\]'"):
        plots.require_matplotlib()
    argv = ["evaluate", str(tmp_path), str(tmp_path), "--plots", str(tmp_path / "p")]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        "dicomnode: --plots needs matplotlib: pip install 'dicomnode[evaluate]'\n"
    )
