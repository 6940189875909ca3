"""``dicomnode models list|show|check`` on packages the test builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dicomnode.cli.main import main
from tests.unit.inference.packages import (
    WrongShape,
    build_bundle_package,
    build_package,
    build_state_dict_package,
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    build_package(models, "test-lungs")
    build_state_dict_package(models, "test-unet")
    build_bundle_package(models, "test-bundle")
    path = tmp_path / "node.toml"
    path.write_text(f'[models]\npath = "{models}"\n')
    return path


def test_list_and_show(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(config), "models", "list")
    assert code == 0
    rows = [line.split()[:4] for line in out.splitlines()[1:]]
    assert rows == [
        ["test-bundle", "0.1", "segmentation", "monai_bundle"],
        ["test-lungs", "0.1", "segmentation", "torchscript"],
        ["test-unet", "0.1", "segmentation", "state_dict"],
    ]
    code, out, _ = run(capsys, "--config", str(config), "models", "list", "--json")
    assert [m["name"] for m in json.loads(out)] == ["test-bundle", "test-lungs", "test-unet"]

    code, out, _ = run(capsys, "--config", str(config), "models", "show", "test-unet")
    assert code == 0
    assert "weights       weights.pt (state_dict)" in out
    assert "network       monai.networks.nets.UNet" in out
    assert "segment 1     Lung: SCT 39607008 'Lung'" in out
    code, out, _ = run(capsys, "--config", str(config), "models", "show", "test-lungs", "--json")
    record = json.loads(out)
    assert record["input"]["matrix"] == [64, 64] and record["weights"]["format"] == "torchscript"

    code, _, err = run(capsys, "--config", str(config), "models", "show", "nope")
    assert code == 1
    assert err.strip() == (
        "dicomnode: no model named 'nope' (installed: test-bundle, test-lungs, test-unet)"
    )


def test_check_loads_and_runs_each_package(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--config", str(config), "models", "check")
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["ok", "test-bundle"],
        ["ok", "test-lungs"],
        ["ok", "test-unet"],
    ]


def test_check_names_what_is_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    build_package(models, "good")
    build_package(models, "wrong-shape", module=WrongShape())
    broken = build_state_dict_package(models, "broken")
    torch.save({"unexpected.weight": torch.zeros(1)}, broken / "weights.pt")
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\npath = "{models}"\n')
    code, out, _ = run(capsys, "--config", str(config), "models", "check")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("FAILED model broken: weights do not fit network UNet")
    assert lines[1].startswith("ok     good 0.1")
    assert (
        lines[2]
        == "FAILED model wrong-shape: for input [1, 1, 64, 64] expected output [1, 1, 64, 64], "
        "got (1, 1, 32, 32)"
    )
    code, out, _ = run(capsys, "--config", str(config), "models", "check", "good")
    assert code == 0 and len(out.splitlines()) == 1


def test_list_says_what_each_task_finds_and_cuts_at_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomnode.imaging import load_registry
    from dicomnode.imaging.manifest import shipped_models_path

    config = tmp_path / "node.toml"
    config.write_text(f'[models]\npath = "{shipped_models_path()}"\n')
    code, out, _ = run(capsys, "--config", str(config), "models", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert "FINDS" in header and "SEGMENTS" not in header
    by_name = {row.split()[0]: row for row in rows}
    # The detector has no fixed segments: it said 0, now what it reports.
    assert "findings: Pulmonary nodule" in by_name["lung-nodule-cnn"]
    assert "segments: Left lung, Right lung" in by_name["lung-unet2d"]
    start = header.index("LICENCE")
    for name, spec in load_registry(shipped_models_path()).items():
        cell = by_name[name][start:].strip()
        if cell != spec.licence:
            # Shortened: whole words of the licence, then "...".
            assert cell.endswith("...") and len(cell) <= 48
            words = cell.removesuffix("...").split()
            assert spec.licence.split()[: len(words)] == words, (cell, spec.licence)


@pytest.mark.parametrize(
    ("text", "width", "expected"),
    [
        ("short", 10, "short"),
        ("MIT (c) 2026 the dicomnode authors; trained", 20, "MIT (c) 2026 the..."),
        ("one verylongwordwithoutspaces", 12, "one..."),
        ("Supercalifragilistic", 10, "Superca..."),
    ],
)
def test_shorten_at_word_boundaries(text: str, width: int, expected: str) -> None:
    from dicomnode.cli.models import shorten

    assert shorten(text, width) == expected
    assert len(shorten(text, width)) <= width
